//! Tests of the migration stream, compatibility check and transports.

use std::io::{Read, Write};
use std::thread;

use super::*;

fn config() -> ConfigSection {
    ConfigSection {
        ram_size: 64 * PAGE_SIZE as u64,
        vcpus: 2,
        ram_blocks: vec![
            RamBlockInfo { id: "ram0".into(), size: 64 * PAGE_SIZE as u64 },
            RamBlockInfo { id: "nv0/ram".into(), size: 4 * PAGE_SIZE as u64 },
        ],
        devices: vec![
            DeviceInfo {
                id: "nv0".into(),
                kind: "nvdimm".into(),
                plugin_version: "0.1.0".into(),
                section_version: 2,
            },
            DeviceInfo {
                id: "io0".into(),
                kind: "iohub".into(),
                plugin_version: "0.1.0".into(),
                section_version: 1,
            },
        ],
    }
}

/// Block memory where page i is filled with byte i+1, except the listed zero pages.
fn memory(pages: usize, zero: &[usize]) -> Vec<u8> {
    let mut m = vec![0u8; pages * PAGE_SIZE];
    for (i, p) in m.chunks_mut(PAGE_SIZE).enumerate() {
        if !zero.contains(&i) {
            p.fill((i + 1) as u8);
            p[7] = 0xa5;
        }
    }
    m
}

/// A stream with every section type, and the RAM it carries.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let ram = memory(64, &[1, 5, 6]);
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.write_config(&config()).unwrap();
    let s = w.write_ram_pages("ram0", &ram, &[0, 1, 2, 3, 5, 9, 63]).unwrap();
    assert_eq!(s, RamStats { pages: 7, zero_pages: 2, bytes: s.bytes });
    w.write_device("nvdimm", "nv0", 2, DeviceStage::Iterate, b"chunk").unwrap();
    w.write_skippable(0x70, b"from the future").unwrap();
    w.write_device("iohub", "io0", 1, DeviceStage::Complete, b"").unwrap();
    w.write_vcpu(1, &[7; 100]).unwrap();
    let bytes = w.finish().unwrap();
    (bytes, ram)
}

/// Read a whole stream into fresh block memories; return the sections too.
fn read_all(bytes: &[u8]) -> Result<(Vec<Section>, Vec<u8>), StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut ram0 = vec![0xeeu8; 64 * PAGE_SIZE];
    let mut nv = vec![0u8; 4 * PAGE_SIZE];
    let mut out = Vec::new();
    loop {
        let s = r.next_section()?;
        match &s {
            Section::Ram(b) if b.block == "ram0" => r.read_ram_into(b, &mut ram0)?,
            Section::Ram(b) => r.read_ram_into(b, &mut nv)?,
            _ => {}
        }
        let end = matches!(s, Section::End { .. });
        out.push(s);
        if end {
            return Ok((out, ram0));
        }
    }
}

#[test]
fn round_trip_every_section() {
    let (bytes, ram) = sample();
    let (sections, got) = read_all(&bytes).unwrap();
    assert_eq!(sections.len(), 6, "{sections:?}");
    assert_eq!(sections[0], Section::Config(config()));
    let Section::Ram(b) = &sections[1] else { panic!("{:?}", sections[1]) };
    assert_eq!(b.block, "ram0");
    let idx: Vec<_> = b.pages.iter().map(|p| (p.index(), p.is_zero())).collect();
    assert_eq!(idx, [(0, false), (1, true), (2, false), (3, false), (5, true), (9, false), (63, false)]);
    assert_eq!(
        sections[2],
        Section::Device(DeviceSection {
            kind: "nvdimm".into(),
            id: "nv0".into(),
            version: 2,
            stage: DeviceStage::Iterate,
            data: b"chunk".to_vec()
        })
    );
    let Section::Device(d) = &sections[3] else { panic!() };
    assert_eq!((d.stage, d.data.len()), (DeviceStage::Complete, 0));
    assert_eq!(sections[4], Section::Vcpu(VcpuSection { index: 1, data: vec![7; 100] }));
    // 7 sections before the end, the skipped one included.
    assert_eq!(sections[5], Section::End { sections: 6 });
    for i in [0, 2, 3, 9, 63] {
        assert_eq!(got[i * PAGE_SIZE..][..PAGE_SIZE], ram[i * PAGE_SIZE..][..PAGE_SIZE], "page {i}");
    }
    for i in [1, 5] {
        assert!(is_zero_page(&got[i * PAGE_SIZE..][..PAGE_SIZE]), "zero page {i} cleared");
    }
    assert!(got[4 * PAGE_SIZE..][..PAGE_SIZE].iter().all(|&b| b == 0xee), "unsent page untouched");
}

#[test]
fn ram_many_batches_and_sink() {
    let mut cfg = config();
    cfg.ram_blocks[0].size = 3000 * PAGE_SIZE as u64;
    let zero: Vec<usize> = (0..3000).filter(|i| i % 7 == 3).collect();
    let ram = memory(3000, &zero);
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.write_config(&cfg).unwrap();
    let s = w.write_ram_block("ram0", &ram).unwrap();
    assert_eq!((s.pages, s.zero_pages), (3000, zero.len() as u64));
    let bytes = w.finish().unwrap();
    assert_eq!(w_sections(&bytes), 3 + 2, "config, 3 batches of <= 1024 pages, end");

    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut got = vec![0u8; ram.len()];
    let mut zeros = 0;
    loop {
        match r.next_section().unwrap() {
            Section::Ram(b) => {
                assert!(b.pages.len() <= MAX_PAGES_PER_BATCH);
                r.read_ram_with(&b, |i, p| {
                    let d = &mut got[i as usize * PAGE_SIZE..][..PAGE_SIZE];
                    match p {
                        Page::Zero => {
                            zeros += 1;
                            d.fill(0)
                        }
                        Page::Data(p) => d.copy_from_slice(p),
                    }
                    Ok(())
                })
                .unwrap();
            }
            Section::End { .. } => break,
            _ => {}
        }
    }
    assert_eq!(zeros, zero.len());
    assert!(got == ram);
}

fn w_sections(bytes: &[u8]) -> u64 {
    let mut r = StreamReader::new(bytes).unwrap();
    loop {
        if let Section::End { sections } = r.next_section().unwrap() {
            return sections + 1;
        }
    }
}

#[test]
fn unread_ram_is_skipped_and_checked() {
    let (mut bytes, _) = sample();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut n = 0;
    while !matches!(r.next_section().unwrap(), Section::End { .. }) {
        n += 1;
    }
    assert_eq!(n, 5);
    // A flipped data bit is still caught when the batch is skipped.
    let off = first_data_offset(&bytes);
    bytes[off + 100] ^= 4;
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_section().unwrap();
    r.next_section().unwrap();
    let e = r.next_section().unwrap_err();
    assert!(matches!(e, StreamError::Checksum { name: "RAM", .. }), "{e}");
    assert!(matches!(r.next_section(), Err(StreamError::Order(_))), "a failed reader stays failed");
}

/// Offset of the first page of data in `sample()`.
fn first_data_offset(bytes: &[u8]) -> usize {
    let mut r = StreamReader::new(bytes).unwrap();
    r.next_section().unwrap();
    let Section::Ram(_) = r.next_section().unwrap() else { panic!() };
    // The reader has consumed exactly the RAM header (64 KiB buffer aside):
    // recompute: stream header, config section, RAM header and entries.
    let cfg_len = u32::from_le_bytes(bytes[16 + 4..16 + 8].try_into().unwrap()) as usize;
    16 + SECTION_HEADER_LEN + cfg_len + SECTION_TRAILER_LEN + SECTION_HEADER_LEN + 1 + 4 + 4 + 7 * 8
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let (bytes, _) = sample();
    for cut in 0..bytes.len() {
        match read_all(&bytes[..cut]) {
            Err(StreamError::Truncated { .. }) => {}
            other => panic!("cut at {cut} of {}: {:?}", bytes.len(), other.map(|(s, _)| s.len())),
        }
    }
    read_all(&bytes).unwrap();
}

#[test]
fn every_bit_flip_is_an_error() {
    let (bytes, _) = sample();
    let data = first_data_offset(&bytes);
    for byte in 0..bytes.len() {
        // Page data bits: only a sample of them, they are all alike.
        if (data..data + 4 * PAGE_SIZE).contains(&byte) && byte % 97 != 0 {
            continue;
        }
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[byte] ^= 1 << bit;
            let e =
                read_all(&b).err().unwrap_or_else(|| panic!("flip of bit {bit} of byte {byte} not detected"));
            if (data..data + 4 * PAGE_SIZE).contains(&byte) {
                assert!(matches!(e, StreamError::Checksum { name: "RAM", .. }), "{e}");
            }
        }
    }
}

#[test]
fn checksum_errors_name_the_section() {
    let (bytes, _) = sample();
    // The config payload.
    let mut b = bytes.clone();
    b[16 + SECTION_HEADER_LEN + 10] ^= 1;
    let e = read_all(&b).unwrap_err();
    assert!(matches!(e, StreamError::Checksum { name: "configuration", .. }), "{e}");
    assert!(e.to_string().contains("checksum mismatch in configuration section"), "{e}");
    // A section header's length.
    let mut b = bytes.clone();
    b[16 + 5] ^= 1;
    let e = read_all(&b).unwrap_err();
    assert!(matches!(e, StreamError::SectionHeaderChecksum { at: At { section: 0, offset: 16 } }), "{e}");
    // The stream header's version.
    let mut b = bytes.clone();
    b[10] ^= 1;
    assert!(matches!(read_all(&b), Err(StreamError::HeaderChecksum)));
    let mut b = bytes;
    b[0] = b'X';
    let e = read_all(&b).unwrap_err();
    assert!(matches!(e, StreamError::BadMagic { .. }) && e.to_string().contains("bad magic"), "{e}");
}

fn header(major: u16, minor: u16) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&major.to_le_bytes());
    h.extend_from_slice(&minor.to_le_bytes());
    let c = crc32c::crc32c(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h
}

fn raw_section(ty: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![ty, flags, 0, 0];
    s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let c = crc32c::crc32c(&s);
    s.extend_from_slice(&c.to_le_bytes());
    s.extend_from_slice(payload);
    s.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    s
}

/// Header + the encoded config section of `config()`.
fn prefix() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.write_config(&config()).unwrap();
    w.flush().unwrap();
    let mut v = w.finish().unwrap();
    v.truncate(v.len() - (SECTION_HEADER_LEN + 8 + SECTION_TRAILER_LEN));
    v
}

fn end(sections: u64) -> Vec<u8> {
    raw_section(section_type::END, 0, &sections.to_le_bytes())
}

fn device_payload(kind: &str, id: &str, version: u32, stage: u8, data: &[u8]) -> Vec<u8> {
    let mut p = vec![kind.len() as u8];
    p.extend_from_slice(kind.as_bytes());
    p.push(id.len() as u8);
    p.extend_from_slice(id.as_bytes());
    p.extend_from_slice(&version.to_le_bytes());
    p.push(stage);
    p.extend_from_slice(data);
    p
}

fn ram_payload(block: &str, entries: &[u64], data_pages: usize) -> Vec<u8> {
    let mut p = vec![block.len() as u8];
    p.extend_from_slice(block.as_bytes());
    p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        p.extend_from_slice(&e.to_le_bytes());
    }
    p.resize(p.len() + data_pages * PAGE_SIZE, 0x11);
    p
}

fn err_of(bytes: &[u8]) -> StreamError {
    read_all(bytes).expect_err("stream must be refused")
}

#[test]
fn versions() {
    let mut b = header(2, 0);
    b.extend_from_slice(&prefix()[16..]);
    let e = err_of(&b);
    assert!(matches!(e, StreamError::UnsupportedMajor { major: 2, supported: 1 }), "{e}");
    assert!(e.to_string().contains("unsupported stream format major version 2"));

    // A newer minor that adds a skippable section: read.
    let mut b = header(1, 7);
    b.extend_from_slice(&prefix()[16..]);
    b.extend(raw_section(0x42, FLAG_SKIPPABLE, &[1, 2, 3]));
    b.extend(end(2));
    let mut r = StreamReader::new(&b[..]).unwrap();
    assert_eq!(r.version(), (1, 7));
    assert!(matches!(r.next_section().unwrap(), Section::Config(_)));
    assert_eq!(r.next_section().unwrap(), Section::End { sections: 2 });
    assert!(matches!(r.next_section(), Err(StreamError::AfterEnd)));

    // An unknown section that is not skippable: refused.
    let mut b = prefix();
    b.extend(raw_section(0x42, 0, &[1, 2, 3]));
    let e = err_of(&b);
    assert!(matches!(e, StreamError::UnknownSection { ty: 0x42, .. }), "{e}");
    assert!(e.to_string().contains("unknown section type 0x42"), "{e}");

    // Reserved flags.
    let mut b = prefix();
    b.extend(raw_section(section_type::VCPU, 0x80, &[0; 4]));
    assert!(matches!(err_of(&b), StreamError::ReservedFlags { flags: 0x80, .. }));
}

#[test]
fn oversize_lengths_are_refused_before_reading() {
    for (ty, len, limit) in [
        (section_type::CONFIG, MAX_CONFIG_PAYLOAD + 1, MAX_CONFIG_PAYLOAD),
        (section_type::RAM, MAX_RAM_PAYLOAD + 1, MAX_RAM_PAYLOAD),
        (section_type::DEVICE, MAX_DEVICE_PAYLOAD + 1, MAX_DEVICE_PAYLOAD),
        (section_type::VCPU, MAX_VCPU_PAYLOAD + 1, MAX_VCPU_PAYLOAD),
        (section_type::END, 9, 8),
        (0x99, u32::MAX, MAX_SKIPPABLE_PAYLOAD),
    ] {
        let mut b = if ty == section_type::CONFIG { header(1, 0) } else { prefix() };
        let mut h = vec![ty, if ty == 0x99 { FLAG_SKIPPABLE } else { 0 }, 0, 0];
        h.extend_from_slice(&len.to_le_bytes());
        let c = crc32c::crc32c(&h);
        h.extend_from_slice(&c.to_le_bytes());
        b.extend(h);
        // No payload follows: had the reader tried to read it, this would be Truncated.
        let e = err_of(&b);
        match e {
            StreamError::TooLong { len: l, limit: m, .. } => assert_eq!((l, m), (len as u64, limit as u64)),
            e => panic!("type {ty:#x}: {e}"),
        }
        assert!(err_of(&b).to_string().contains("exceeds limit"));
    }
    // A device section that claims 200 MiB and sends 10 bytes: truncated
    // (and the buffer only grew with what arrived).
    let mut b = prefix();
    let mut h = vec![section_type::DEVICE, 0, 0, 0];
    h.extend_from_slice(&(200u32 << 20).to_le_bytes());
    let c = crc32c::crc32c(&h);
    h.extend_from_slice(&c.to_le_bytes());
    b.extend(h);
    b.extend_from_slice(&[0; 10]);
    assert!(matches!(err_of(&b), StreamError::Truncated { .. }));
}

#[test]
fn malformed_sections() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[0], 1)), "ok"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram9", &[0], 1)), "UnknownRamBlock"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[64], 1)), "PageOutOfRange"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[1 << 60], 1)), "Malformed"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[0], 2)), "Malformed"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[], 0)), "Malformed"),
        (raw_section(section_type::RAM, 0, &ram_payload("ram0", &[0; 1025], 0)), "Malformed"),
        (raw_section(section_type::DEVICE, 0, &device_payload("nvdimm", "nv0", 2, 1, b"x")), "ok"),
        (
            raw_section(section_type::DEVICE, 0, &device_payload("nvdimm", "nv0", 3, 1, b"x")),
            "DeviceVersionTooNew",
        ),
        (raw_section(section_type::DEVICE, 0, &device_payload("vfio", "nv0", 1, 1, b"x")), "UnknownDevice"),
        (raw_section(section_type::DEVICE, 0, &device_payload("nvdimm", "nv9", 1, 1, b"x")), "UnknownDevice"),
        (raw_section(section_type::DEVICE, 0, &device_payload("nvdimm", "nv0", 1, 2, b"x")), "Malformed"),
        (raw_section(section_type::DEVICE, 0, &[3, b'a']), "Malformed"),
        (raw_section(section_type::VCPU, 0, &[1, 0, 0, 0, 9]), "ok"),
        (raw_section(section_type::VCPU, 0, &[2, 0, 0, 0, 9]), "VcpuOutOfRange"),
        (raw_section(section_type::VCPU, 0, &[2, 0]), "Malformed"),
        (raw_section(section_type::CONFIG, 0, &[]), "DuplicateConfig"),
        (raw_section(section_type::END, 0, &[0; 4]), "Malformed"),
    ];
    for (section, want) in cases {
        let mut b = prefix();
        b.extend(section);
        let expect_end = if want == "DuplicateConfig" { 1 } else { 2 };
        b.extend(end(expect_end));
        let got = match read_all(&b) {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:?}"),
        };
        assert!(got.starts_with(want), "want {want}, got {got}");
    }
    // Section count.
    let mut b = prefix();
    b.extend(end(5));
    let e = err_of(&b);
    assert!(matches!(e, StreamError::SectionCount { stored: 5, counted: 1 }), "{e}");
    // Not starting with a configuration.
    let mut b = header(1, 0);
    b.extend(end(0));
    let e = err_of(&b);
    assert!(matches!(e, StreamError::ConfigNotFirst { found: "end" }), "{e}");
    // Bad configurations.
    for (mutate, want) in [
        (Box::new(|c: &mut ConfigSection| c.vcpus = 0) as Box<dyn Fn(&mut ConfigSection)>, "vCPU count"),
        (Box::new(|c: &mut ConfigSection| c.ram_blocks[1].id = "ram0".into()), "declared twice"),
        (Box::new(|c: &mut ConfigSection| c.devices[1].id = "nv0".into()), "declared twice"),
        (Box::new(|c: &mut ConfigSection| c.ram_blocks[0].size = 100), "multiple of the page size"),
        (Box::new(|c: &mut ConfigSection| c.devices[0].kind = "k".repeat(256)), "exceeds limit"),
    ] {
        let mut c = config();
        mutate(&mut c);
        let e = StreamWriter::new(Vec::new()).unwrap().write_config(&c).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn reader_misuse() {
    let (bytes, _) = sample();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_section().unwrap();
    let Section::Ram(b) = r.next_section().unwrap() else { panic!() };
    let mut small = vec![0u8; 8 * PAGE_SIZE];
    let e = r.read_ram_into(&b, &mut small).unwrap_err();
    assert!(matches!(e, StreamError::DestinationTooSmall { index: 9, .. }), "{e}");

    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_section().unwrap();
    let Section::Ram(b) = r.next_section().unwrap() else { panic!() };
    let mut mem = vec![0u8; 64 * PAGE_SIZE];
    r.read_ram_into(&b, &mut mem).unwrap();
    assert!(matches!(r.read_ram_into(&b, &mut mem), Err(StreamError::StaleBatch)));

    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_section().unwrap();
    let Section::Ram(b) = r.next_section().unwrap() else { panic!() };
    let e = r
        .read_ram_with(&b, |i, _| if i == 3 { Err(std::io::Error::other("no")) } else { Ok(()) })
        .unwrap_err();
    assert!(matches!(e, StreamError::Sink { index: 3, .. }), "{e}");
}

#[test]
fn writer_refuses_what_the_reader_would() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    let mem = memory(64, &[]);
    assert!(matches!(w.write_ram_block("ram0", &mem), Err(StreamError::Order(_))));
    assert!(matches!(w.write_vcpu(0, &[]), Err(StreamError::Order(_))));
    w.write_config(&config()).unwrap();
    assert!(matches!(w.write_config(&config()), Err(StreamError::Order(_))));
    assert!(matches!(w.write_ram_block("ramX", &mem), Err(StreamError::UnknownRamBlock { .. })));
    assert!(matches!(
        w.write_ram_pages("ram0", &mem, &[64]),
        Err(StreamError::PageOutOfRange { index: 64, .. })
    ));
    assert!(matches!(
        w.write_ram_pages("nv0/ram", &mem[..PAGE_SIZE], &[1]),
        Err(StreamError::DestinationTooSmall { .. })
    ));
    assert!(matches!(
        w.write_device("nvdimm", "io0", 1, DeviceStage::Complete, &[]),
        Err(StreamError::UnknownDevice { .. })
    ));
    let e = w.write_device("iohub", "io0", 2, DeviceStage::Complete, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device section version 2 of \"iohub\" instance \"io0\" newer than supported 1"
    );
    let big = vec![0u8; MAX_DEVICE_DATA as usize + 1];
    assert!(matches!(
        w.write_device("iohub", "io0", 1, DeviceStage::Complete, &big),
        Err(StreamError::TooLong { .. })
    ));
    assert!(matches!(w.write_vcpu(2, &[]), Err(StreamError::VcpuOutOfRange { .. })));
    assert!(matches!(w.write_vcpu(0, &big[..MAX_VCPU_DATA as usize + 1]), Err(StreamError::TooLong { .. })));
    // Nothing of that reached the stream: it still reads.
    let bytes = w.finish().unwrap();
    assert_eq!(read_all(&bytes).unwrap().0.len(), 2);
}

#[test]
fn zero_page_detection() {
    let mut p = vec![0u8; PAGE_SIZE];
    assert!(is_zero_page(&p));
    for i in [0, 1, 7, 8, 2047, 4095] {
        p[i] = 1;
        assert!(!is_zero_page(&p), "byte {i}");
        p[i] = 0;
    }
}

/// Deterministic xorshift for the fuzz-like tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What the fuzz target does: read everything, never panic.
fn drain(bytes: &[u8]) -> Result<(), StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut mem = vec![0u8; 64 * PAGE_SIZE];
    let mut n = 0u32;
    loop {
        match r.next_section()? {
            Section::Ram(b) if n & 1 == 0 => r.read_ram_into(&b, &mut mem)?,
            Section::Ram(b) => r.read_ram_with(&b, |_, _| Ok(()))?,
            Section::End { .. } => return Ok(()),
            _ => {}
        }
        n += 1;
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let (bytes, _) = sample();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut refused = 0;
    for round in 0..4000 {
        let mut b = if round % 4 == 0 {
            // Random bytes after a valid stream header.
            let mut b = header(1, rng.below(3) as u16);
            b.extend((0..rng.below(3000)).map(|_| rng.next() as u8));
            b
        } else {
            bytes.clone()
        };
        for _ in 0..1 + rng.below(4) {
            let len = b.len();
            match rng.below(5) {
                0 => b[rng.below(len)] ^= 1 << rng.below(8),
                1 => b[rng.below(len)] = rng.next() as u8,
                2 => b.truncate(rng.below(len)),
                3 => {
                    let at = rng.below(len);
                    b.splice(at..at, (0..rng.below(16)).map(|_| rng.next() as u8));
                }
                _ => {
                    // Overwrite a length-looking field with a large value.
                    let at = rng.below(len.saturating_sub(4));
                    if let Some(f) = b.get_mut(at..at + 4) {
                        f.copy_from_slice(&(rng.next() as u32).to_le_bytes());
                    }
                }
            }
            if b.is_empty() {
                break;
            }
        }
        if drain(&b).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 3900, "mutations should almost always be refused, {refused} were");
}

#[test]
fn compatibility() {
    let local = config();
    check_compatibility(&local, &local).unwrap();
    let mut other = local.clone();
    other.devices[0].plugin_version = "9.9.9".into();
    other.devices[0].section_version = 1;
    check_compatibility(&local, &other).unwrap();

    let mut inc = local.clone();
    inc.ram_size *= 2;
    inc.vcpus = 4;
    inc.ram_blocks[1].size = PAGE_SIZE as u64;
    inc.ram_blocks[0].id = "ramA".into();
    inc.devices[0].section_version = 3;
    inc.devices[1].kind = "vfio-pci".into();
    inc.devices.push(DeviceInfo {
        id: "d9".into(),
        kind: "pc-dimm".into(),
        plugin_version: "1".into(),
        section_version: 1,
    });
    let e = check_compatibility(&local, &inc).unwrap_err();
    let m = &e.mismatches;
    assert!(m.contains(&Mismatch::RamSize { source_size: 128 * 4096, local: 64 * 4096 }));
    assert!(m.contains(&Mismatch::VcpuCount { source_count: 4, local: 2 }));
    assert!(m.contains(&Mismatch::MissingRamBlock { id: "ramA".into() }));
    assert!(m.contains(&Mismatch::ExtraRamBlock { id: "ram0".into() }));
    assert!(m.contains(&Mismatch::RamBlockSize { id: "nv0/ram".into(), source_size: 4096, local: 4 * 4096 }));
    assert!(m.contains(&Mismatch::SectionVersionTooNew {
        id: "nv0".into(),
        kind: "nvdimm".into(),
        version: 3,
        supported: 2
    }));
    assert!(m.contains(&Mismatch::DeviceKind {
        id: "io0".into(),
        source_kind: "vfio-pci".into(),
        local: "iohub".into()
    }));
    assert!(m.contains(&Mismatch::MissingDevice { id: "d9".into(), kind: "pc-dimm".into() }));
    assert_eq!(m.len(), 8, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("state version 3 is newer than the destination plugin's state_version 2"),
        "{text}"
    );
    assert!(text.contains("device \"d9\" (pc-dimm) of the source is missing on the destination"), "{text}");

    let mut fewer = local.clone();
    fewer.devices.pop();
    let e = check_compatibility(&local, &fewer).unwrap_err();
    assert_eq!(e.mismatches, [Mismatch::ExtraDevice { id: "io0".into(), kind: "iohub".into() }]);
}

#[test]
fn uri_parsing() {
    let ok = [
        ("tcp:127.0.0.1:4444", MigrationUri::Tcp { host: "127.0.0.1".into(), port: 4444 }),
        ("tcp:[::1]:0", MigrationUri::Tcp { host: "::1".into(), port: 0 }),
        ("tcp:host.example:1", MigrationUri::Tcp { host: "host.example".into(), port: 1 }),
        ("unix:/run/mig.sock", MigrationUri::Unix("/run/mig.sock".into())),
        ("file:/tmp/a:b", MigrationUri::File("/tmp/a:b".into())),
    ];
    for (s, want) in ok {
        let u: MigrationUri = s.parse().unwrap();
        assert_eq!(u, want);
        assert_eq!(u.to_string(), s);
    }
    for (s, want) in [
        ("127.0.0.1:4444", "no scheme"),
        ("udp:1.2.3.4:5", "unknown migration URI scheme \"udp\""),
        ("tcp:1.2.3.4", "expected tcp:HOST:PORT"),
        ("tcp:1.2.3.4:99999", "port is not a number"),
        ("tcp::5", "empty host"),
        ("tcp:::1:5", "must be in brackets"),
        ("tcp:[::1:5", "unclosed"),
        ("unix:", "empty path"),
        ("file:", "empty path"),
    ] {
        let e = s.parse::<MigrationUri>().unwrap_err();
        assert!(e.to_string().contains(want), "{s}: {e}");
    }
}

/// Send `sample()`'s sections over `uri` from a thread; read them here.
fn over_transport(uri: &MigrationUri) {
    let listener = listen(uri).unwrap();
    let target = listener.uri();
    let ram = memory(64, &[1, 5, 6]);
    let ram2 = ram.clone();
    let sender = thread::spawn(move || {
        let s = connect(&target).unwrap();
        let mut w = StreamWriter::new(s).unwrap();
        w.write_config(&config()).unwrap();
        w.write_ram_block("ram0", &ram2).unwrap();
        w.write_device("nvdimm", "nv0", 2, DeviceStage::Complete, &[3; 5000]).unwrap();
        w.write_vcpu(0, b"regs").unwrap();
        w.finish().unwrap();
    });
    let sender = if matches!(uri, MigrationUri::File(_)) {
        // A file is read once it is written.
        sender.join().unwrap();
        None
    } else {
        Some(sender)
    };
    let s = listener.accept().unwrap();
    let mut r = StreamReader::new(s).unwrap();
    let mut mem = vec![0u8; ram.len()];
    let mut seen = Vec::new();
    loop {
        let s = r.next_section().unwrap();
        seen.push(s.type_code());
        match s {
            Section::Config(c) => check_compatibility(&config(), &c).unwrap(),
            Section::Ram(b) => r.read_ram_into(&b, &mut mem).unwrap(),
            Section::Device(d) => assert_eq!(d.data, vec![3; 5000]),
            Section::Vcpu(v) => assert_eq!(v.data, b"regs"),
            Section::End { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    if let Some(t) = sender {
        t.join().unwrap();
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    assert!(mem == ram);
}

#[test]
fn tcp_loopback() {
    over_transport(&"tcp:127.0.0.1:0".parse().unwrap());
}

#[test]
fn unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mig.sock");
    over_transport(&MigrationUri::Unix(path.clone()));
    assert!(!path.exists(), "socket path removed after accept");
    // A stale socket is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    over_transport(&MigrationUri::Unix(path));
}

#[test]
fn file_transport() {
    let dir = tempfile::tempdir().unwrap();
    let uri = MigrationUri::File(dir.path().join("vm.mig"));
    over_transport(&uri);
    let mut s = listen(&uri).unwrap().accept().unwrap();
    assert!(s.write(b"x").is_err(), "the destination's file is read-only");
    assert!(matches!(s.try_clone(), Err(TransportError::NoReturnPath)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).unwrap();
    assert_eq!(magic, MAGIC);
}

#[test]
fn transport_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = connect(&MigrationUri::Unix(dir.path().join("none"))).unwrap_err();
    assert!(e.to_string().starts_with("cannot connect to unix:"), "{e}");
    let e = listen(&MigrationUri::File(dir.path().join("none"))).unwrap().accept().unwrap_err();
    assert!(e.to_string().starts_with("cannot open migration file"), "{e}");
    // A regular file where the socket should go is not removed.
    let f = dir.path().join("plain");
    std::fs::write(&f, b"keep").unwrap();
    let e = listen(&MigrationUri::Unix(f.clone())).unwrap_err();
    assert!(e.to_string().starts_with("cannot listen on unix:"), "{e}");
    assert_eq!(std::fs::read(&f).unwrap(), b"keep");
    // A closed port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = connect(&MigrationUri::Tcp { host: "127.0.0.1".into(), port }).unwrap_err();
    assert!(matches!(e, TransportError::Connect(..)), "{e}");
}

#[test]
fn return_path_clone() {
    let listener = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let target = listener.uri();
    let t = thread::spawn(move || {
        let s = connect(&target).unwrap();
        let mut back = s.try_clone().unwrap();
        let mut b = [0u8; 4];
        back.read_exact(&mut b).unwrap();
        b
    });
    let mut s = listener.accept().unwrap();
    s.write_all(b"req!").unwrap();
    assert_eq!(&t.join().unwrap(), b"req!");
}

#[test]
fn bench_small_run_moves_the_data() {
    // Checks the benchmark's plumbing (it verifies the copy); rates are not
    // meaningful in a debug build.
    let r = bench::run(8 << 20, 4 << 20).unwrap();
    assert_eq!(r.bytes, 8 << 20);
    assert!(r.tcp_stream > 0.0 && r.tcp_raw > 0.0 && r.unix_stream > 0.0);
    assert!(bench::run(1, 100).is_err());
}

/// `read_ram_into_file` writes data pages into a shared memfd mapping through
/// the file (what the destination does for guest RAM), with the same result
/// as storing through the mapping.
#[test]
fn ram_read_into_a_memfd_through_the_file() {
    use std::os::fd::{AsRawFd, FromRawFd};
    let (bytes, ram) = sample();
    let size = 64 * PAGE_SIZE;
    // SAFETY: valid name and flags.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    // SAFETY: a fresh shared mapping of the memfd, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping is `size` bytes and lives until the munmap below.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), size) };
    // Stale content on the page the stream says is zero must be cleared.
    mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0x77);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.next_section().unwrap();
    let Section::Ram(b) = r.next_section().unwrap() else { panic!() };
    r.read_ram_into_file(&b, mem, &file, 0).unwrap();
    for i in [0usize, 1, 2, 3, 5, 9, 63] {
        let range = i * PAGE_SIZE..(i + 1) * PAGE_SIZE;
        assert_eq!(&mem[range.clone()], &ram[range], "page {i}");
    }
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(p, size) };
}

#[test]
fn sync_section_round_trips_and_older_readers_may_skip_it() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    assert!(matches!(w.write_sync(1), Err(StreamError::Order(_))));
    w.write_config(&config()).unwrap();
    let at = w.bytes_written() as usize;
    w.write_sync(41).unwrap();
    let bytes = w.finish().unwrap();
    assert_eq!(bytes[at], section_type::SYNC);
    assert_eq!(bytes[at + 1], FLAG_SKIPPABLE, "a 1.1 reader skips it");
    let (sections, _) = read_all(&bytes).unwrap();
    assert_eq!(sections[1..], [Section::Sync { token: 41 }, Section::End { sections: 2 }]);

    let mut short = prefix();
    short.extend(raw_section(section_type::SYNC, FLAG_SKIPPABLE, &[1, 2, 3]));
    short.extend(end(2));
    assert!(read_all(&short).is_err(), "a sync payload is exactly a u64");
}

#[test]
fn configuration_counts_over_their_limits_are_refused() {
    let cfg = |blocks: u16, devices: Option<u16>| {
        let mut p = Vec::new();
        p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        p.extend_from_slice(&(1u64 << 20).to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&blocks.to_le_bytes());
        if let Some(d) = devices {
            p.extend_from_slice(&d.to_le_bytes());
        }
        let mut s = header(VERSION_MAJOR, VERSION_MINOR);
        s.extend(raw_section(section_type::CONFIG, 0, &p));
        s
    };
    for (bytes, what) in
        [(cfg(MAX_RAM_BLOCKS as u16 + 1, None), "RAM block count"), (cfg(0, Some(u16::MAX)), "device count")]
    {
        match StreamReader::new(&bytes[..]).and_then(|mut r| r.next_section()) {
            Err(StreamError::TooLong { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
}

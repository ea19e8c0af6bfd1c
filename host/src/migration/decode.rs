//! [`StreamReader`]: the destination side of the migration stream.
//!
//! The input is untrusted. Every length is checked against its limit before
//! anything is read or allocated for it, payloads are read into buffers that
//! grow with the bytes that actually arrive (a lying length costs no more
//! memory than the data sent), and no input makes the reader panic: every
//! problem is a [`StreamError`].

use std::io::{BufReader, Read};

use super::format::*;

/// Capacity of the reader's buffer: the size of its socket reads. Each
/// read that waits for data costs a wake-up, which is expensive on this
/// nested host: 1 MiB reads migrated 1 GiB in 0.6–0.8 s where 64 KiB reads
/// took 0.9–1.1 s (same run, loopback TCP).
pub const READ_BUFFER: usize = 1 << 20;
/// Page data is copied from the read buffer to the destination and
/// checksummed in pieces of this size, while they are in the cache (reads
/// into a hot buffer plus a copy beat reads straight into cold destination
/// memory: 3.7 against 2.6 GB/s in the stream bench).
const CHUNK: usize = 32 << 10;

/// One page of a RAM batch handed to a [`StreamReader::read_ram_with`] sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    /// The page is all zeroes.
    Zero,
    /// The page's [`PAGE_SIZE`] bytes.
    Data(&'a [u8]),
}

/// The RAM section whose page data is still in the stream.
struct PendingRam {
    seq: u64,
    at: At,
    /// CRC32C of the payload read so far.
    crc: u32,
    /// Data bytes still in the stream.
    data_len: u64,
}

/// Reads a migration stream: the header on creation, then typed sections
/// from [`next_section`](Self::next_section).
///
/// After any error the stream position is undefined: every later call
/// returns [`StreamError::Order`].
pub struct StreamReader<R: Read> {
    input: BufReader<R>,
    offset: u64,
    minor: u16,
    config: Option<ConfigSection>,
    /// Sections whose header was read.
    sections: u64,
    pending: Option<PendingRam>,
    ended: bool,
    failed: bool,
    phase: Phase,
    /// Reused by [`read_ram_into_file`](Self::read_ram_into_file).
    scratch: Vec<u8>,
}

/// Where a stream is in the post-copy protocol (format 1.1): which of its
/// sections may come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Pre-copy: any section; post-copy pending or run may start post-copy.
    Precopy,
    /// Pending sections seen: more of them, device and vCPU state, then run.
    Pending,
    /// After run or resume: only RAM and the end section.
    Postcopy,
}

impl<R: Read> StreamReader<R> {
    /// Read and check the stream header.
    pub fn new(input: R) -> Result<Self, StreamError> {
        Self::with_capacity(READ_BUFFER, input)
    }

    pub fn with_capacity(capacity: usize, input: R) -> Result<Self, StreamError> {
        let mut r = Self {
            input: BufReader::with_capacity(capacity, input),
            offset: 0,
            minor: 0,
            config: None,
            sections: 0,
            pending: None,
            ended: false,
            failed: false,
            phase: Phase::Precopy,
            scratch: Vec::new(),
        };
        let mut h = [0u8; STREAM_HEADER_LEN];
        r.fill(&mut h, "stream header")?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[..8]);
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        if crc32c::crc32c(&h[..12]) != le32(&h[12..16]) {
            return Err(StreamError::HeaderChecksum);
        }
        let major = le16(&h[8..10]);
        let minor = le16(&h[10..12]);
        if major != VERSION_MAJOR {
            return Err(StreamError::UnsupportedMajor { major, supported: VERSION_MAJOR });
        }
        if minor > VERSION_MINOR {
            log::info!(
                "migration stream format {major}.{minor} is newer than {VERSION_MAJOR}.{VERSION_MINOR}: \
                 skipping the sections it adds"
            );
        }
        r.minor = minor;
        Ok(r)
    }

    /// Format version of the stream: (major, minor).
    pub fn version(&self) -> (u16, u16) {
        (VERSION_MAJOR, self.minor)
    }

    /// The stream's configuration section, once read.
    pub fn config(&self) -> Option<&ConfigSection> {
        self.config.as_ref()
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The transport.
    pub fn get_ref(&self) -> &R {
        self.input.get_ref()
    }

    /// The transport (for a return path).
    pub fn get_mut(&mut self) -> &mut R {
        self.input.get_mut()
    }

    /// The next section. A [`Section::Ram`] leaves its page data in the
    /// stream for [`read_ram_into`](Self::read_ram_into) or
    /// [`read_ram_with`](Self::read_ram_with); if neither is called, this
    /// skips it (still checking its checksum).
    pub fn next_section(&mut self) -> Result<Section, StreamError> {
        self.guard(|r| r.next_section_inner())
    }

    /// Read the page data of `batch` straight into `mem`, the memory of its
    /// block (page `i` at `mem[i * PAGE_SIZE..]`); zero pages are cleared
    /// (only if not already zero, so untouched memory stays unallocated).
    ///
    /// The checksum covers the data, so it is verified after the data is in
    /// `mem`: on an error `mem` may hold unverified bytes, and the
    /// migration must be abandoned (which an error means anyway).
    pub fn read_ram_into(&mut self, batch: &RamBatch, mem: &mut [u8]) -> Result<(), StreamError> {
        self.guard(|r| r.read_ram_into_inner(batch, mem, None))
    }

    /// [`read_ram_into`](Self::read_ram_into) for memory that is a mapping
    /// of `file` from `file_offset` (a memfd): data pages are written with
    /// `pwrite` instead of stored through the mapping. On shmem that skips
    /// the kernel's zeroing of each freshly allocated page (a store through
    /// the mapping faults in a zeroed page first), which was half of the
    /// destination's time. Zero pages still go through `mem`.
    pub fn read_ram_into_file(
        &mut self,
        batch: &RamBatch,
        mem: &mut [u8],
        file: &std::fs::File,
        file_offset: u64,
    ) -> Result<(), StreamError> {
        self.guard(|r| r.read_ram_into_inner(batch, mem, Some((file, file_offset))))
    }

    /// Read the page data of `batch`, verify its checksum, then hand each
    /// page to `sink(index, page)` in stream order. Uses a buffer of up to
    /// one batch (4 MiB); [`read_ram_into`](Self::read_ram_into) is faster.
    pub fn read_ram_with<F>(&mut self, batch: &RamBatch, mut sink: F) -> Result<(), StreamError>
    where
        F: FnMut(u64, Page<'_>) -> std::io::Result<()>,
    {
        self.guard(|r| r.read_ram_with_inner(batch, &mut sink))
    }

    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, StreamError>) -> Result<T, StreamError> {
        if self.failed {
            return Err(StreamError::Order("the stream already failed"));
        }
        let r = f(self);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        self.input.read_exact(buf).map_err(|e| StreamError::read(e, what, self.offset))?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn read_u32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    /// `len` bytes, in a buffer that grows as they arrive.
    fn read_vec(&mut self, len: u32, what: &'static str) -> Result<Vec<u8>, StreamError> {
        let mut v = Vec::with_capacity((len as usize).min(READ_BUFFER));
        let n = (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut v)
            .map_err(|e| StreamError::read(e, what, self.offset))?;
        self.offset += n as u64;
        if n != len as usize {
            return Err(StreamError::Truncated { what, offset: self.offset });
        }
        Ok(v)
    }

    /// Consume `len` bytes, returning their running CRC from `crc`.
    fn skip(&mut self, mut len: u64, mut crc: u32, what: &'static str) -> Result<u32, StreamError> {
        let mut buf = [0u8; 16 * 1024];
        while len > 0 {
            let n = (len as usize).min(buf.len());
            self.fill(&mut buf[..n], what)?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            len -= n as u64;
        }
        Ok(crc)
    }

    fn check_trailer(&mut self, ty: u8, at: At, computed: u32) -> Result<(), StreamError> {
        let stored = self.read_u32("section checksum")?;
        if stored != computed {
            return Err(StreamError::Checksum { name: section_name(ty), at, stored, computed });
        }
        Ok(())
    }

    fn next_section_inner(&mut self) -> Result<Section, StreamError> {
        if self.ended {
            return Err(StreamError::AfterEnd);
        }
        if let Some(p) = self.pending.take() {
            log::debug!("migration stream: skipping unread data of RAM batch ({})", p.at);
            let crc = self.skip(p.data_len, p.crc, "RAM page data")?;
            self.check_trailer(section_type::RAM, p.at, crc)?;
        }
        loop {
            let at = At { section: self.sections, offset: self.offset };
            let mut h = [0u8; SECTION_HEADER_LEN];
            self.fill(&mut h, "section header")?;
            if crc32c::crc32c(&h[..8]) != le32(&h[8..12]) {
                return Err(StreamError::SectionHeaderChecksum { at });
            }
            self.sections += 1;
            let (ty, flags, reserved, len) = (h[0], h[1], le16(&h[2..4]), le32(&h[4..8]));
            if flags & !FLAG_SKIPPABLE != 0 || reserved != 0 {
                return Err(StreamError::ReservedFlags { ty, flags, at });
            }
            let limit = match ty {
                section_type::CONFIG => MAX_CONFIG_PAYLOAD,
                section_type::RAM => MAX_RAM_PAYLOAD,
                section_type::DEVICE => MAX_DEVICE_PAYLOAD,
                section_type::VCPU => MAX_VCPU_PAYLOAD,
                section_type::END => 8,
                section_type::POSTCOPY_PENDING => MAX_BITMAP_PAYLOAD,
                section_type::POSTCOPY_RUN | section_type::POSTCOPY_RESUME => 0,
                section_type::SYNC => 8,
                _ if flags & FLAG_SKIPPABLE != 0 => MAX_SKIPPABLE_PAYLOAD,
                _ => return Err(StreamError::UnknownSection { ty, at }),
            };
            if len > limit {
                return Err(StreamError::TooLong {
                    what: section_len_name(ty),
                    len: u64::from(len),
                    limit: u64::from(limit),
                });
            }
            match (ty, &self.config) {
                (section_type::CONFIG, Some(_)) => return Err(StreamError::DuplicateConfig { at }),
                (section_type::CONFIG, None) => {}
                (_, None) => return Err(StreamError::ConfigNotFirst { found: section_name(ty) }),
                _ => {}
            }
            self.check_phase(ty, at)?;
            match ty {
                section_type::RAM => return self.ram_header(at, len),
                section_type::CONFIG
                | section_type::DEVICE
                | section_type::VCPU
                | section_type::END
                | section_type::POSTCOPY_PENDING
                | section_type::POSTCOPY_RUN
                | section_type::POSTCOPY_RESUME
                | section_type::SYNC => {
                    let payload = self.read_vec(len, "section payload")?;
                    self.check_trailer(ty, at, crc32c::crc32c(&payload))?;
                    return self.parse(ty, &payload);
                }
                _ => {
                    log::debug!(
                        "migration stream: skipping unknown section type {ty:#04x} ({at}, {len} bytes)"
                    );
                    let crc = self.skip(u64::from(len), 0, "skippable section")?;
                    self.check_trailer(ty, at, crc)?;
                }
            }
        }
    }

    /// The post-copy ordering rules (format 1.1): pending sections before
    /// run, run at most once, resume only first after the configuration,
    /// and after run or resume no device or vCPU state.
    fn check_phase(&mut self, ty: u8, at: At) -> Result<(), StreamError> {
        let refuse = |why| Err(StreamError::Unexpected { found: section_name(ty), at, why });
        match (ty, self.phase) {
            (section_type::POSTCOPY_PENDING, Phase::Postcopy) => refuse("post-copy already running"),
            (section_type::POSTCOPY_PENDING, _) => {
                self.phase = Phase::Pending;
                Ok(())
            }
            (section_type::POSTCOPY_RUN, Phase::Pending) => {
                self.phase = Phase::Postcopy;
                Ok(())
            }
            (section_type::POSTCOPY_RUN, Phase::Precopy) => refuse("no post-copy pending section came first"),
            (section_type::POSTCOPY_RUN, Phase::Postcopy) => refuse("post-copy already running"),
            // The configuration is section 0; resume must be section 1.
            (section_type::POSTCOPY_RESUME, Phase::Precopy) if self.sections == 2 => {
                self.phase = Phase::Postcopy;
                Ok(())
            }
            (section_type::POSTCOPY_RESUME, _) => refuse("resume must directly follow the configuration"),
            (section_type::RAM, Phase::Pending) => refuse("RAM between post-copy pending and run"),
            (section_type::DEVICE | section_type::VCPU, Phase::Postcopy) => {
                refuse("the guest already runs on the destination")
            }
            (section_type::END, Phase::Pending) => refuse("post-copy was announced but never started"),
            _ => Ok(()),
        }
    }

    /// Whether the stream entered post-copy (a run or resume section was read).
    pub fn in_postcopy(&self) -> bool {
        self.phase == Phase::Postcopy
    }

    fn parse(&mut self, ty: u8, payload: &[u8]) -> Result<Section, StreamError> {
        let mut p = Parser { buf: payload, pos: 0, section: section_name(ty) };
        let section = match ty {
            section_type::CONFIG => {
                let c = parse_config(&mut p)?;
                log::info!(
                    "migration stream {}.{}: {} MiB RAM, {} vCPUs, {} RAM blocks, {} devices",
                    VERSION_MAJOR,
                    self.minor,
                    c.ram_size >> 20,
                    c.vcpus,
                    c.ram_blocks.len(),
                    c.devices.len()
                );
                self.config = Some(c.clone());
                Section::Config(c)
            }
            section_type::DEVICE => {
                let kind = p.string()?;
                let id = p.string()?;
                let version = p.u32()?;
                let stage = p.u8()?;
                let stage =
                    DeviceStage::from_u8(stage).ok_or_else(|| p.bad(format!("unknown stage {stage}")))?;
                let data = p.rest().to_vec();
                let dev = self
                    .config
                    .as_ref()
                    .and_then(|c| c.device(&id))
                    .filter(|d| d.kind == kind)
                    .ok_or_else(|| StreamError::UnknownDevice { kind: kind.clone(), id: id.clone() })?;
                if version > dev.section_version {
                    return Err(StreamError::DeviceVersionTooNew {
                        kind,
                        id,
                        version,
                        supported: dev.section_version,
                    });
                }
                if data.len() > MAX_DEVICE_DATA as usize {
                    return Err(StreamError::TooLong {
                        what: "device section data",
                        len: data.len() as u64,
                        limit: u64::from(MAX_DEVICE_DATA),
                    });
                }
                Section::Device(DeviceSection { kind, id, version, stage, data })
            }
            section_type::VCPU => {
                let index = p.u32()?;
                let count = self.config.as_ref().map_or(0, |c| c.vcpus);
                if index >= count {
                    return Err(StreamError::VcpuOutOfRange { index, count });
                }
                Section::Vcpu(VcpuSection { index, data: p.rest().to_vec() })
            }
            section_type::POSTCOPY_PENDING => {
                let block = p.string()?;
                let pages = self
                    .config
                    .as_ref()
                    .and_then(|c| c.ram_block(&block))
                    .map(RamBlockInfo::pages)
                    .ok_or_else(|| StreamError::UnknownRamBlock { block: block.clone() })?;
                let raw = p.rest();
                let words = bitmap_words(pages);
                if raw.len() as u64 != words * 8 {
                    return Err(p.bad(format!(
                        "bitmap of {} bytes for a block of {pages} pages (expected {})",
                        raw.len(),
                        words * 8
                    )));
                }
                let bitmap: Vec<u64> = raw.chunks_exact(8).map(le64).collect();
                let tail = pages % 64;
                if tail != 0 && bitmap.last().is_some_and(|w| w >> tail != 0) {
                    return Err(p.bad(format!("bitmap marks pages beyond the {pages} of block {block:?}")));
                }
                Section::PostcopyPending { block, bitmap }
            }
            section_type::POSTCOPY_RUN => Section::PostcopyRun,
            section_type::POSTCOPY_RESUME => Section::PostcopyResume,
            section_type::SYNC => Section::Sync { token: p.u64()? },
            _ => {
                let stored = p.u64()?;
                p.end()?;
                let counted = self.sections - 1;
                if stored != counted {
                    return Err(StreamError::SectionCount { stored, counted });
                }
                self.ended = true;
                log::debug!("migration stream: end after {counted} sections, {} bytes", self.offset);
                return Ok(Section::End { sections: stored });
            }
        };
        p.end()?;
        Ok(section)
    }

    /// The fixed part of a RAM section: block id, count, page entries.
    fn ram_header(&mut self, at: At, len: u32) -> Result<Section, StreamError> {
        let bad = |reason: String| StreamError::Malformed { section: "RAM".into(), reason };
        let mut n = [0u8; 1];
        self.fill(&mut n, "RAM block id")?;
        let mut id = vec![0u8; usize::from(n[0])];
        self.fill(&mut id, "RAM block id")?;
        let mut count = [0u8; 4];
        self.fill(&mut count, "RAM page count")?;
        let mut crc = crc32c::crc32c_append(crc32c::crc32c(&n), &id);
        crc = crc32c::crc32c_append(crc, &count);
        let block = String::from_utf8(id).map_err(|_| bad("block id is not UTF-8".into()))?;
        let count = u32::from_le_bytes(count) as usize;
        if count == 0 || count > MAX_PAGES_PER_BATCH {
            return Err(bad(format!("page count {count} is not in 1..={MAX_PAGES_PER_BATCH}")));
        }
        let fixed = 1 + block.len() + RAM_COUNT_LEN + 8 * count;
        if (len as usize) < fixed {
            return Err(bad(format!("payload of {len} bytes is shorter than its {count} page entries")));
        }
        let mut raw = [0u8; 8 * MAX_PAGES_PER_BATCH];
        let raw = &mut raw[..8 * count];
        self.fill(raw, "RAM page entries")?;
        crc = crc32c::crc32c_append(crc, raw);
        let pages_in_block = self
            .config
            .as_ref()
            .and_then(|c| c.ram_block(&block))
            .map(RamBlockInfo::pages)
            .ok_or_else(|| StreamError::UnknownRamBlock { block: block.clone() })?;
        let mut pages = Vec::with_capacity(count);
        for e in raw.chunks_exact(8) {
            let v = le64(e);
            if v & !(PAGE_INDEX_MASK | PAGE_ZERO_BIT) != 0 {
                return Err(bad(format!("page entry {v:#x} has reserved bits set")));
            }
            let e = PageEntry(v);
            if e.index() >= pages_in_block {
                return Err(StreamError::PageOutOfRange { block, index: e.index(), pages: pages_in_block });
            }
            pages.push(e);
        }
        let data_pages = pages.iter().filter(|p| !p.is_zero()).count();
        let expect = fixed + PAGE_SIZE * data_pages;
        if len as usize != expect {
            return Err(bad(format!(
                "payload is {len} bytes, expected {expect} for {count} pages of which {data_pages} carry data"
            )));
        }
        let seq = self.sections;
        self.pending = Some(PendingRam { seq, at, crc, data_len: (PAGE_SIZE * data_pages) as u64 });
        Ok(Section::Ram(RamBatch { block, pages, seq }))
    }

    fn take_pending(&mut self, batch: &RamBatch) -> Result<PendingRam, StreamError> {
        match self.pending.take() {
            Some(p) if p.seq == batch.seq => Ok(p),
            other => {
                self.pending = other;
                Err(StreamError::StaleBatch)
            }
        }
    }

    fn read_ram_into_inner(
        &mut self,
        batch: &RamBatch,
        mem: &mut [u8],
        file: Option<(&std::fs::File, u64)>,
    ) -> Result<(), StreamError> {
        let p = self.take_pending(batch)?;
        let mut crc = p.crc;
        // A run of data pages with consecutive indices: [first, end) in pages.
        let mut run: Option<(u64, u64)> = None;
        for e in &batch.pages {
            let i = e.index();
            if !e.is_zero() {
                match run {
                    Some((s, end)) if end == i => run = Some((s, end + 1)),
                    Some(r) => {
                        crc = self.read_run(&batch.block, mem, r, crc, file)?;
                        run = Some((i, i + 1));
                    }
                    None => run = Some((i, i + 1)),
                }
                continue;
            }
            if let Some(r) = run.take() {
                crc = self.read_run(&batch.block, mem, r, crc, file)?;
            }
            let len = mem.len();
            let page = range_mut(mem, i, i + 1).ok_or_else(|| StreamError::DestinationTooSmall {
                block: batch.block.clone(),
                index: i,
                len,
            })?;
            if !is_zero_page(page) {
                page.fill(0);
            }
        }
        if let Some(r) = run {
            crc = self.read_run(&batch.block, mem, r, crc, file)?;
        }
        self.check_trailer(section_type::RAM, p.at, crc)
    }

    fn read_run(
        &mut self,
        block: &str,
        mem: &mut [u8],
        (s, end): (u64, u64),
        crc: u32,
        file: Option<(&std::fs::File, u64)>,
    ) -> Result<u32, StreamError> {
        use std::os::unix::fs::FileExt;
        let len = mem.len();
        let dst = range_mut(mem, s, end).ok_or_else(|| StreamError::DestinationTooSmall {
            block: block.into(),
            index: end.saturating_sub(1),
            len,
        })?;
        let mut crc = crc;
        let Some((file, base)) = file else {
            for piece in dst.chunks_mut(CHUNK) {
                self.fill(piece, "RAM page data")?;
                crc = crc32c::crc32c_append(crc, piece);
            }
            return Ok(crc);
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(CHUNK, 0);
        let mut at = base + s * PAGE_SIZE as u64;
        let mut left = dst.len();
        let result = loop {
            if left == 0 {
                break Ok(crc);
            }
            let n = left.min(CHUNK);
            if let Err(e) = self.fill(&mut scratch[..n], "RAM page data") {
                break Err(e);
            }
            crc = crc32c::crc32c_append(crc, &scratch[..n]);
            if let Err(e) = file.write_all_at(&scratch[..n], at) {
                break Err(StreamError::Io(e));
            }
            at += n as u64;
            left -= n;
        };
        self.scratch = scratch;
        result
    }

    fn read_ram_with_inner(
        &mut self,
        batch: &RamBatch,
        sink: &mut dyn FnMut(u64, Page<'_>) -> std::io::Result<()>,
    ) -> Result<(), StreamError> {
        let p = self.take_pending(batch)?;
        // data_len was checked against the section length, itself bounded.
        let data = self.read_vec(p.data_len as u32, "RAM page data")?;
        let crc = crc32c::crc32c_append(p.crc, &data);
        self.check_trailer(section_type::RAM, p.at, crc)?;
        let mut pages = data.chunks_exact(PAGE_SIZE);
        for e in &batch.pages {
            let page = if e.is_zero() {
                Page::Zero
            } else {
                // As many chunks as data entries: counted in ram_header.
                pages.next().map_or(Page::Zero, Page::Data)
            };
            sink(e.index(), page).map_err(|source| StreamError::Sink {
                block: batch.block.clone(),
                index: e.index(),
                source,
            })?;
        }
        Ok(())
    }
}

fn range_mut(mem: &mut [u8], first: u64, end: u64) -> Option<&mut [u8]> {
    let s = usize::try_from(first).ok()?.checked_mul(PAGE_SIZE)?;
    let e = usize::try_from(end).ok()?.checked_mul(PAGE_SIZE)?;
    mem.get_mut(s..e)
}

fn section_len_name(ty: u8) -> &'static str {
    match ty {
        section_type::CONFIG => "configuration section payload",
        section_type::RAM => "RAM section payload",
        section_type::DEVICE => "device section payload",
        section_type::VCPU => "vCPU section payload",
        section_type::END => "end section payload",
        section_type::POSTCOPY_PENDING => "post-copy pending section payload",
        section_type::POSTCOPY_RUN | section_type::POSTCOPY_RESUME => "post-copy marker payload",
        section_type::SYNC => "sync section payload",
        _ => "skippable section payload",
    }
}

fn parse_config(p: &mut Parser<'_>) -> Result<ConfigSection, StreamError> {
    let page_size = p.u32()?;
    if page_size as usize != PAGE_SIZE {
        return Err(p.bad(format!("page size {page_size} is not {PAGE_SIZE}")));
    }
    let ram_size = p.u64()?;
    let vcpus = p.u32()?;
    let nblocks = p.count("RAM block count", MAX_RAM_BLOCKS)?;
    let mut ram_blocks = Vec::with_capacity(nblocks);
    for _ in 0..nblocks {
        let id = p.string()?;
        let size = p.u64()?;
        ram_blocks.push(RamBlockInfo { id, size });
    }
    let ndev = p.count("device count", MAX_DEVICES)?;
    let mut devices = Vec::with_capacity(ndev);
    for _ in 0..ndev {
        let id = p.string()?;
        let kind = p.string()?;
        let plugin_version = p.string()?;
        let section_version = p.u32()?;
        devices.push(DeviceInfo { id, kind, plugin_version, section_version });
    }
    let c = ConfigSection { ram_size, vcpus, ram_blocks, devices };
    c.validate()?;
    Ok(c)
}

/// A bounds-checked cursor over a verified payload.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    section: &'static str,
}

impl<'a> Parser<'a> {
    /// A `u16` count, refused when over `limit`.
    fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, StreamError> {
        let n = usize::from(self.u16()?);
        if n > limit {
            return Err(StreamError::TooLong { what, len: n as u64, limit: limit as u64 });
        }
        Ok(n)
    }

    fn bad(&self, reason: String) -> StreamError {
        StreamError::Malformed { section: self.section.into(), reason }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        let s = self.pos.checked_add(n).and_then(|end| self.buf.get(self.pos..end)).ok_or_else(|| {
            self.bad(format!("payload ends at byte {} inside a {n}-byte field", self.buf.len()))
        })?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, StreamError> {
        Ok(le16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, StreamError> {
        Ok(le32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, StreamError> {
        Ok(le64(self.take(8)?))
    }
    fn string(&mut self) -> Result<String, StreamError> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8".into()))
    }
    fn rest(&mut self) -> &'a [u8] {
        let r = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        r
    }
    fn end(&self) -> Result<(), StreamError> {
        if self.pos != self.buf.len() {
            return Err(self.bad(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

fn le16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}
fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

//! [`StreamWriter`]: the source side of the migration stream.

use std::io::{BufWriter, IoSlice, Write};

use super::format::*;

/// Capacity of the writer's buffer. RAM batches larger than it bypass it
/// (vectored writes straight from guest memory).
pub const WRITE_BUFFER: usize = 64 << 10;
/// RAM data is checksummed and written in groups of about this many bytes
/// (more than [`WRITE_BUFFER`], so they bypass it; small enough to stay in
/// the cache between the checksum and the kernel's copy).
const CHUNK: usize = 256 << 10;

/// What a RAM write sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages sent (zero and data).
    pub pages: u64,
    /// Of which all-zero (sent as a marker only).
    pub zero_pages: u64,
    /// Bytes put on the stream, headers and checksums included.
    pub bytes: u64,
}

impl std::ops::AddAssign for RamStats {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.bytes += o.bytes;
    }
}

/// Writes a migration stream: the header on creation, then the
/// configuration section, then any RAM, device and vCPU sections, then
/// [`finish`](Self::finish) writes the end section.
///
/// The writer enforces what the reader checks (limits, pages in range of a
/// declared block, devices declared), so it never produces a stream its
/// reader refuses.
pub struct StreamWriter<W: Write> {
    out: BufWriter<W>,
    config: Option<ConfigSection>,
    sections: u64,
    bytes: u64,
    /// Reused per RAM batch: section header, block id, count, entries.
    head: Vec<u8>,
    /// Reused per RAM batch: a snapshot of the page data being sent.
    bounce: Vec<u8>,
    /// Reused per RAM batch: (page index, zero) of the batch.
    entries: Vec<PageEntry>,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream on `inner`, writing its header.
    pub fn new(inner: W) -> Result<Self, StreamError> {
        Self::with_capacity(WRITE_BUFFER, inner)
    }

    pub fn with_capacity(capacity: usize, inner: W) -> Result<Self, StreamError> {
        let mut w = Self {
            out: BufWriter::with_capacity(capacity, inner),
            config: None,
            sections: 0,
            bytes: 0,
            head: Vec::with_capacity(SECTION_HEADER_LEN + 1 + MAX_STRING_LEN + 4 + 8 * MAX_PAGES_PER_BATCH),
            entries: Vec::with_capacity(MAX_PAGES_PER_BATCH),
            bounce: Vec::with_capacity(CHUNK),
        };
        let mut h = [0u8; STREAM_HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        h[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        let crc = crc32c::crc32c(&h[..12]);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        w.out.write_all(&h)?;
        w.bytes += STREAM_HEADER_LEN as u64;
        Ok(w)
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        self.out.get_ref()
    }

    /// Sections written so far.
    pub fn sections(&self) -> u64 {
        self.sections
    }

    /// Bytes written so far (some may still be buffered).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The configuration section: must be the first and only one.
    pub fn write_config(&mut self, config: &ConfigSection) -> Result<(), StreamError> {
        if self.config.is_some() {
            return Err(StreamError::Order("configuration section written twice"));
        }
        config.validate()?;
        let mut p = Vec::with_capacity(64 + 32 * (config.devices.len() + config.ram_blocks.len()));
        p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        p.extend_from_slice(&config.ram_size.to_le_bytes());
        p.extend_from_slice(&config.vcpus.to_le_bytes());
        p.extend_from_slice(&(config.ram_blocks.len() as u16).to_le_bytes());
        for b in &config.ram_blocks {
            put_str(&mut p, &b.id);
            p.extend_from_slice(&b.size.to_le_bytes());
        }
        p.extend_from_slice(&(config.devices.len() as u16).to_le_bytes());
        for d in &config.devices {
            put_str(&mut p, &d.id);
            put_str(&mut p, &d.kind);
            put_str(&mut p, &d.plugin_version);
            p.extend_from_slice(&d.section_version.to_le_bytes());
        }
        if p.len() > MAX_CONFIG_PAYLOAD as usize {
            return Err(StreamError::TooLong {
                what: "configuration section",
                len: p.len() as u64,
                limit: MAX_CONFIG_PAYLOAD as u64,
            });
        }
        self.put_section(section_type::CONFIG, 0, &[&p])?;
        self.config = Some(config.clone());
        log::debug!(
            "migration stream: configuration with {} RAM blocks, {} devices",
            config.ram_blocks.len(),
            config.devices.len()
        );
        Ok(())
    }

    /// Every page of RAM block `block`, whose memory is `mem`.
    pub fn write_ram_block(&mut self, block: &str, mem: &[u8]) -> Result<RamStats, StreamError> {
        let pages = (mem.len() / PAGE_SIZE) as u64;
        self.write_ram_range(block, mem, 0..pages)
    }

    /// Pages `range` of RAM block `block`, whose memory is `mem`.
    pub fn write_ram_range(
        &mut self,
        block: &str,
        mem: &[u8],
        range: std::ops::Range<u64>,
    ) -> Result<RamStats, StreamError> {
        self.write_ram_iter(block, mem, range)
    }

    /// Pages `pages` (indices, e.g. from a dirty bitmap) of RAM block
    /// `block`, whose memory is `mem`: batches of up to
    /// [`MAX_PAGES_PER_BATCH`] pages, zero pages as markers.
    pub fn write_ram_pages(
        &mut self,
        block: &str,
        mem: &[u8],
        pages: &[u64],
    ) -> Result<RamStats, StreamError> {
        self.write_ram_iter(block, mem, pages.iter().copied())
    }

    fn write_ram_iter(
        &mut self,
        block: &str,
        mem: &[u8],
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<RamStats, StreamError> {
        let config = self.config.as_ref().ok_or(StreamError::Order("RAM section before configuration"))?;
        let info =
            config.ram_block(block).ok_or_else(|| StreamError::UnknownRamBlock { block: block.into() })?;
        let block_pages = info.pages();
        let mut stats = RamStats::default();
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        let mut result = Ok(());
        for index in pages {
            if index >= block_pages {
                result = Err(StreamError::PageOutOfRange { block: block.into(), index, pages: block_pages });
                break;
            }
            let Some(page) = page_of(mem, index) else {
                result = Err(StreamError::DestinationTooSmall { block: block.into(), index, len: mem.len() });
                break;
            };
            entries.push(PageEntry::new(index, is_zero_page(page)));
            if entries.len() == MAX_PAGES_PER_BATCH {
                match self.put_ram_batch(block, mem, &entries) {
                    Ok(s) => stats += s,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                entries.clear();
            }
        }
        if result.is_ok() && !entries.is_empty() {
            match self.put_ram_batch(block, mem, &entries) {
                Ok(s) => stats += s,
                Err(e) => result = Err(e),
            }
        }
        self.entries = entries;
        result.map(|()| stats)
    }

    /// One RAM section: header and entries from `self.head`, page data
    /// straight from `mem` as vectored writes of contiguous runs.
    fn put_ram_batch(
        &mut self,
        block: &str,
        mem: &[u8],
        entries: &[PageEntry],
    ) -> Result<RamStats, StreamError> {
        check_string("RAM block id", block)?;
        let data_pages = entries.iter().filter(|e| !e.is_zero()).count();
        let payload_len = 1 + block.len() + RAM_COUNT_LEN + 8 * entries.len() + PAGE_SIZE * data_pages;
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        push_section_header(&mut head, section_type::RAM, 0, payload_len as u32);
        put_str(&mut head, block);
        head.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            head.extend_from_slice(&e.0.to_le_bytes());
        }

        // Guest memory changes under us while the VM runs, so each piece
        // is copied into a bounce buffer first: the checksum and the bytes
        // sent are of the same snapshot (a page changed meanwhile is dirty
        // and goes again in a later round).
        let mut crc = crc32c::crc32c(&head[SECTION_HEADER_LEN..]);
        self.out.write_all(&head)?;
        let mut bounce = std::mem::take(&mut self.bounce);
        bounce.clear();
        let runs = RunIter { entries: entries.iter(), pending: None };
        for (s, end) in runs {
            let mut at = s;
            while at < end {
                let n = (end - at).min(CHUNK - bounce.len());
                bounce.extend_from_slice(&mem[at..at + n]);
                at += n;
                if bounce.len() == CHUNK {
                    crc = crc32c::crc32c_append(crc, &bounce);
                    self.out.write_all(&bounce)?;
                    bounce.clear();
                }
            }
        }
        if !bounce.is_empty() {
            crc = crc32c::crc32c_append(crc, &bounce);
            self.out.write_all(&bounce)?;
        }
        self.bounce = bounce;
        // Buffered: goes out with the next section.
        self.out.write_all(&crc.to_le_bytes())?;
        self.head = head;
        let total = SECTION_HEADER_LEN + payload_len + SECTION_TRAILER_LEN;
        self.sections += 1;
        self.bytes += total as u64;
        Ok(RamStats {
            pages: entries.len() as u64,
            zero_pages: (entries.len() - data_pages) as u64,
            bytes: total as u64,
        })
    }

    /// A device section: `data` from a device's save handler at `stage`,
    /// in its state format `version`.
    pub fn write_device(
        &mut self,
        kind: &str,
        id: &str,
        version: u32,
        stage: DeviceStage,
        data: &[u8],
    ) -> Result<(), StreamError> {
        let config = self.config.as_ref().ok_or(StreamError::Order("device section before configuration"))?;
        let dev = config
            .device(id)
            .filter(|d| d.kind == kind)
            .ok_or_else(|| StreamError::UnknownDevice { kind: kind.into(), id: id.into() })?;
        if version > dev.section_version {
            return Err(StreamError::DeviceVersionTooNew {
                kind: kind.into(),
                id: id.into(),
                version,
                supported: dev.section_version,
            });
        }
        if data.len() > MAX_DEVICE_DATA as usize {
            return Err(StreamError::TooLong {
                what: "device section",
                len: data.len() as u64,
                limit: MAX_DEVICE_DATA as u64,
            });
        }
        let mut head = Vec::with_capacity(2 * (1 + MAX_STRING_LEN) + DEVICE_FIXED_LEN);
        put_str(&mut head, kind);
        put_str(&mut head, id);
        head.extend_from_slice(&version.to_le_bytes());
        head.push(stage as u8);
        self.put_section(section_type::DEVICE, 0, &[&head, data])
    }

    /// A vCPU state section: opaque bytes of the VM layer.
    pub fn write_vcpu(&mut self, index: u32, data: &[u8]) -> Result<(), StreamError> {
        let config = self.config.as_ref().ok_or(StreamError::Order("vCPU section before configuration"))?;
        if index >= config.vcpus {
            return Err(StreamError::VcpuOutOfRange { index, count: config.vcpus });
        }
        if data.len() > MAX_VCPU_DATA as usize {
            return Err(StreamError::TooLong {
                what: "vCPU section",
                len: data.len() as u64,
                limit: MAX_VCPU_DATA as u64,
            });
        }
        self.put_section(section_type::VCPU, 0, &[&index.to_le_bytes(), data])
    }

    /// Post-copy: the pages of `block` the source still sends (bit i =
    /// page i), exactly one bit per page of the block.
    pub fn write_postcopy_pending(&mut self, block: &str, bitmap: &[u64]) -> Result<(), StreamError> {
        let config =
            self.config.as_ref().ok_or(StreamError::Order("post-copy section before configuration"))?;
        let info =
            config.ram_block(block).ok_or_else(|| StreamError::UnknownRamBlock { block: block.into() })?;
        check_string("RAM block id", block)?;
        let words = bitmap_words(info.pages()) as usize;
        if bitmap.len() != words {
            return Err(StreamError::Order("post-copy bitmap length does not match its block"));
        }
        let mut p = Vec::with_capacity(1 + block.len() + 8 * words);
        put_str(&mut p, block);
        for w in bitmap {
            p.extend_from_slice(&w.to_le_bytes());
        }
        if p.len() > MAX_BITMAP_PAYLOAD as usize {
            return Err(StreamError::TooLong {
                what: "post-copy pending section",
                len: p.len() as u64,
                limit: u64::from(MAX_BITMAP_PAYLOAD),
            });
        }
        self.put_section(section_type::POSTCOPY_PENDING, 0, &[&p])
    }

    /// Post-copy: the destination resumes the guest now (flushed).
    pub fn write_postcopy_run(&mut self) -> Result<(), StreamError> {
        self.put_section(section_type::POSTCOPY_RUN, 0, &[])?;
        self.flush()
    }

    /// The first section after the configuration of a stream that resumes
    /// a paused post-copy migration.
    pub fn write_postcopy_resume(&mut self) -> Result<(), StreamError> {
        if self.config.is_none() || self.sections != 1 {
            return Err(StreamError::Order("resume must directly follow the configuration"));
        }
        self.put_section(section_type::POSTCOPY_RESUME, 0, &[])?;
        self.flush()
    }

    /// A sync section (marked skippable: a 1.1 reader ignores it), flushed:
    /// the destination answers `synced TOKEN` once everything before it is
    /// loaded.
    pub fn write_sync(&mut self, token: u64) -> Result<(), StreamError> {
        if self.config.is_none() {
            return Err(StreamError::Order("sync section before configuration"));
        }
        self.put_section(section_type::SYNC, FLAG_SKIPPABLE, &[&token.to_le_bytes()])?;
        self.flush()
    }

    /// A section of a type this version does not define, marked
    /// skippable: for tests of forward compatibility, and for sections a
    /// newer minor version adds.
    pub fn write_skippable(&mut self, ty: u8, payload: &[u8]) -> Result<(), StreamError> {
        if payload.len() > MAX_SKIPPABLE_PAYLOAD as usize {
            return Err(StreamError::TooLong {
                what: "skippable section",
                len: payload.len() as u64,
                limit: MAX_SKIPPABLE_PAYLOAD as u64,
            });
        }
        self.put_section(ty, FLAG_SKIPPABLE, &[payload])
    }

    /// Push buffered bytes to the transport.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.out.flush()?;
        Ok(())
    }

    /// Write the end section and flush; the transport stays open (its
    /// return path may still be in use).
    pub fn write_end(&mut self) -> Result<(), StreamError> {
        let count = self.sections;
        self.put_section(section_type::END, 0, &[&count.to_le_bytes()])?;
        self.out.flush()?;
        log::debug!("migration stream: finished, {} sections, {} bytes", self.sections, self.bytes);
        Ok(())
    }

    /// Write the end section, flush, and hand back the transport.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.write_end()?;
        self.out.into_inner().map_err(|e| StreamError::Io(e.into_error()))
    }

    fn put_section(&mut self, ty: u8, flags: u8, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len).map_err(|_| StreamError::TooLong {
            what: "section payload",
            len: len as u64,
            limit: u32::MAX as u64,
        })?;
        let mut head = Vec::with_capacity(SECTION_HEADER_LEN);
        push_section_header(&mut head, ty, flags, len32);
        let crc = parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
        let trailer = crc.to_le_bytes();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 2);
        slices.push(IoSlice::new(&head));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        slices.push(IoSlice::new(&trailer));
        write_all_vectored(&mut self.out, &mut slices)?;
        self.sections += 1;
        self.bytes += (SECTION_HEADER_LEN + len + SECTION_TRAILER_LEN) as u64;
        Ok(())
    }
}

/// Byte ranges of the data pages of a batch: consecutive pages merged, each
/// range at most [`CHUNK`] bytes.
struct RunIter<'a> {
    entries: std::slice::Iter<'a, PageEntry>,
    pending: Option<(usize, usize)>,
}

impl Iterator for RunIter<'_> {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        for e in self.entries.by_ref().filter(|e| !e.is_zero()) {
            let start = e.index() as usize * PAGE_SIZE;
            match self.pending {
                Some((s, end)) if end == start && end - s < CHUNK => {
                    self.pending = Some((s, start + PAGE_SIZE))
                }
                prev => {
                    self.pending = Some((start, start + PAGE_SIZE));
                    if prev.is_some() {
                        return prev;
                    }
                }
            }
        }
        self.pending.take()
    }
}

fn page_of(mem: &[u8], index: u64) -> Option<&[u8]> {
    let start = usize::try_from(index).ok()?.checked_mul(PAGE_SIZE)?;
    mem.get(start..start.checked_add(PAGE_SIZE)?)
}

fn push_section_header(out: &mut Vec<u8>, ty: u8, flags: u8, len: u32) {
    let start = out.len();
    out.extend_from_slice(&[ty, flags, 0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Callers check the length first (`check_string`/`validate`).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(MAX_STRING_LEN);
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

/// `Write::write_all_vectored` (unstable in std): through a `BufWriter`,
/// large slices go to the transport in one `writev` without a copy.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

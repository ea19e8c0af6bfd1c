//! The migration stream format: constants, section types and [`StreamError`].
//!
//! The wire format is specified in `docs/migration-stream.md`; this module is
//! its single source of truth in code. Every integer is little-endian.

use std::fmt;
use std::io;

use thiserror::Error;

/// First eight bytes of every stream. The high first byte catches 7-bit
/// channels, the trailing `\n` catches line-ending translation (as PNG's).
pub const MAGIC: [u8; 8] = *b"\x89DMHMIG\n";
/// Format major version this code reads and writes. A reader refuses any other.
pub const VERSION_MAJOR: u16 = 1;
/// Format minor version this code writes. A reader accepts a newer minor: it
/// may only add sections marked [`FLAG_SKIPPABLE`].
pub const VERSION_MINOR: u16 = 2;
/// Stream header: magic, major, minor, CRC32C of the preceding 12 bytes.
pub const STREAM_HEADER_LEN: usize = 16;
/// Section header: type, flags, reserved u16, payload length u32, CRC32C of
/// the preceding 8 bytes.
pub const SECTION_HEADER_LEN: usize = 12;
/// Section trailer: CRC32C of the payload.
pub const SECTION_TRAILER_LEN: usize = 4;

/// The only page size of format 1.x.
pub const PAGE_SIZE: usize = 4096;
/// Pages in one RAM section at most (4 MiB of data).
pub const MAX_PAGES_PER_BATCH: usize = 1024;
/// Longest string (ids, kinds, versions): the length prefix is one byte.
pub const MAX_STRING_LEN: usize = 255;
/// RAM blocks in a configuration section at most.
pub const MAX_RAM_BLOCKS: usize = 256;
/// Devices in a configuration section at most.
pub const MAX_DEVICES: usize = 1024;
/// vCPUs at most.
pub const MAX_VCPUS: u32 = 4096;
/// Pages in one RAM block at most (2^40 pages = 4 PiB).
pub const MAX_BLOCK_PAGES: u64 = 1 << 40;
/// Payload of a configuration section at most.
pub const MAX_CONFIG_PAYLOAD: u32 = 1 << 20;
/// Device state bytes in one device section at most (256 MiB).
pub const MAX_DEVICE_DATA: u32 = 256 << 20;
/// vCPU state bytes in one vCPU section at most.
pub const MAX_VCPU_DATA: u32 = 1 << 20;
/// Payload of an unknown, skippable section at most.
pub const MAX_SKIPPABLE_PAYLOAD: u32 = 256 << 20;

/// Section flag: a reader that does not know the section type skips it.
pub const FLAG_SKIPPABLE: u8 = 0x01;
/// Bit 63 of a RAM page entry: the page is all zeroes and carries no data.
pub const PAGE_ZERO_BIT: u64 = 1 << 63;
/// Bits of a page entry that hold the page index.
pub const PAGE_INDEX_MASK: u64 = (1 << 52) - 1;

/// Section type codes.
pub mod section_type {
    pub const CONFIG: u8 = 0x01;
    pub const RAM: u8 = 0x02;
    pub const DEVICE: u8 = 0x03;
    pub const VCPU: u8 = 0x04;
    pub const END: u8 = 0x05;
    /// 1.1: pages of a block the source still sends in post-copy.
    pub const POSTCOPY_PENDING: u8 = 0x06;
    /// 1.1: the destination resumes the guest; pages keep coming.
    pub const POSTCOPY_RUN: u8 = 0x07;
    /// 1.1: this stream resumes a paused post-copy migration.
    pub const POSTCOPY_RESUME: u8 = 0x08;
    /// 1.2, skippable: the destination answers `synced TOKEN` on the return
    /// path once it has loaded everything before it.
    pub const SYNC: u8 = 0x09;
}

/// Payload of a post-copy pending section at most (a bitmap of 2^31 pages).
pub const MAX_BITMAP_PAYLOAD: u32 = 256 << 20;

/// Fixed part of a RAM section payload after the block id: the page count.
pub(crate) const RAM_COUNT_LEN: usize = 4;
/// Fixed part of a device section after its two strings: version + stage.
pub(crate) const DEVICE_FIXED_LEN: usize = 5;

/// Largest valid payload of a RAM section.
pub const MAX_RAM_PAYLOAD: u32 =
    (1 + MAX_STRING_LEN + RAM_COUNT_LEN + MAX_PAGES_PER_BATCH * (8 + PAGE_SIZE)) as u32;
/// Largest valid payload of a device section.
pub const MAX_DEVICE_PAYLOAD: u32 = MAX_DEVICE_DATA + (2 * (1 + MAX_STRING_LEN) + DEVICE_FIXED_LEN) as u32;
/// Largest valid payload of a vCPU section.
pub const MAX_VCPU_PAYLOAD: u32 = MAX_VCPU_DATA + 4;

/// A RAM block as the configuration section declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// `ram0` for guest RAM, `<device-id>/ram` for a plugin backend.
    pub id: String,
    /// Size in bytes, a non-zero multiple of [`PAGE_SIZE`].
    pub size: u64,
}

impl RamBlockInfo {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

/// A device as the configuration section declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Instance id, unique in the VM.
    pub id: String,
    /// Device kind (the plugin's kind name).
    pub kind: String,
    /// Version of the plugin that provides it (informative).
    pub plugin_version: String,
    /// Version of the state sections this side writes (source) or the
    /// newest it loads (destination): the device's `state_version()`.
    pub section_version: u32,
}

/// The configuration section: what the destination checks before it loads
/// anything. Always the first section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSection {
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    pub vcpus: u32,
    /// Every RAM block the stream may carry pages of.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// Every device the stream may carry state of.
    pub devices: Vec<DeviceInfo>,
}

impl ConfigSection {
    pub fn ram_block(&self, id: &str) -> Option<&RamBlockInfo> {
        self.ram_blocks.iter().find(|b| b.id == id)
    }
    pub fn device(&self, id: &str) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Check the limits and invariants a reader enforces, so a writer never
    /// produces a stream its reader refuses.
    pub fn validate(&self) -> Result<(), StreamError> {
        let bad = |reason: String| StreamError::Malformed { section: "configuration".into(), reason };
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(bad(format!("vCPU count {} is not in 1..={MAX_VCPUS}", self.vcpus)));
        }
        if !page_aligned(self.ram_size) {
            return Err(bad(format!("RAM size {:#x} is not a multiple of the page size", self.ram_size)));
        }
        check_count("RAM block count", self.ram_blocks.len(), MAX_RAM_BLOCKS)?;
        check_count("device count", self.devices.len(), MAX_DEVICES)?;
        for (i, b) in self.ram_blocks.iter().enumerate() {
            check_string("RAM block id", &b.id)?;
            if b.id.is_empty() {
                return Err(bad("empty RAM block id".into()));
            }
            if b.size == 0 || !page_aligned(b.size) || b.pages() > MAX_BLOCK_PAGES {
                return Err(bad(format!(
                    "RAM block {:?} size {:#x} is not a non-zero multiple of the page size up to {MAX_BLOCK_PAGES} pages",
                    b.id, b.size
                )));
            }
            if self.ram_blocks[..i].iter().any(|o| o.id == b.id) {
                return Err(bad(format!("RAM block {:?} declared twice", b.id)));
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            check_string("device id", &d.id)?;
            check_string("device kind", &d.kind)?;
            check_string("plugin version", &d.plugin_version)?;
            if d.id.is_empty() || d.kind.is_empty() {
                return Err(bad("empty device id or kind".into()));
            }
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(bad(format!("device {:?} declared twice", d.id)));
            }
        }
        Ok(())
    }
}

/// Words of a bitmap with one bit per page of a `pages`-page block.
pub fn bitmap_words(pages: u64) -> u64 {
    pages.div_ceil(64)
}

/// Whether `x` is a multiple of [`PAGE_SIZE`] (a power of two).
pub(crate) fn page_aligned(x: u64) -> bool {
    x & (PAGE_SIZE as u64 - 1) == 0
}

pub(crate) fn check_string(what: &'static str, s: &str) -> Result<(), StreamError> {
    if s.len() > MAX_STRING_LEN {
        return Err(StreamError::TooLong { what, len: s.len() as u64, limit: MAX_STRING_LEN as u64 });
    }
    Ok(())
}

fn check_count(what: &'static str, n: usize, limit: usize) -> Result<(), StreamError> {
    if n > limit {
        return Err(StreamError::TooLong { what, len: n as u64, limit: limit as u64 });
    }
    Ok(())
}

/// Which save handler produced a device section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeviceStage {
    /// A `save_live_iterate` chunk (VM running).
    Iterate = 0,
    /// The `save_live_complete_precopy` state (VM stopped).
    Complete = 1,
}

impl DeviceStage {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Iterate),
            1 => Some(Self::Complete),
            _ => None,
        }
    }
}

/// A device section: plugin bytes for `load_state(version, data)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    pub kind: String,
    pub id: String,
    pub version: u32,
    pub stage: DeviceStage,
    pub data: Vec<u8>,
}

/// A vCPU state section: opaque bytes of the VM layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuSection {
    pub index: u32,
    pub data: Vec<u8>,
}

/// One page entry of a RAM batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry(pub(crate) u64);

impl PageEntry {
    pub fn new(index: u64, zero: bool) -> Self {
        Self((index & PAGE_INDEX_MASK) | if zero { PAGE_ZERO_BIT } else { 0 })
    }
    /// Page index in its block (byte offset / [`PAGE_SIZE`]).
    pub fn index(self) -> u64 {
        self.0 & PAGE_INDEX_MASK
    }
    /// The page is all zeroes: no data follows for it.
    pub fn is_zero(self) -> bool {
        self.0 & PAGE_ZERO_BIT != 0
    }
}

/// The header of a RAM section. Its page data is still in the stream: take
/// it with [`StreamReader::read_ram_into`](super::StreamReader::read_ram_into)
/// or [`read_ram_with`](super::StreamReader::read_ram_with), or let the next
/// `next_section` skip it (still checksummed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBatch {
    pub block: String,
    pub pages: Vec<PageEntry>,
    /// Sequence number of the section in the stream: ties the batch to the
    /// reader state it came from.
    pub(crate) seq: u64,
}

impl RamBatch {
    /// Pages that carry data.
    pub fn data_pages(&self) -> usize {
        self.pages.iter().filter(|p| !p.is_zero()).count()
    }
}

/// A typed section, as [`StreamReader::next_section`](super::StreamReader::next_section) yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Section {
    Config(ConfigSection),
    Ram(RamBatch),
    Device(DeviceSection),
    Vcpu(VcpuSection),
    /// End of stream; `sections` counts every section before it.
    End {
        sections: u64,
    },
    /// Post-copy: the pages of `block` (bit i = page i) that the source
    /// still holds and sends after the guest runs on the destination.
    PostcopyPending {
        block: String,
        bitmap: Vec<u64>,
    },
    /// Post-copy: resume the guest now; RAM sections keep coming.
    PostcopyRun,
    /// A stream that resumes a paused post-copy migration.
    PostcopyResume,
    /// Everything before this section is loaded: answer `token`.
    Sync {
        token: u64,
    },
}

impl Section {
    pub fn type_code(&self) -> u8 {
        match self {
            Section::Config(_) => section_type::CONFIG,
            Section::Ram(_) => section_type::RAM,
            Section::Device(_) => section_type::DEVICE,
            Section::Vcpu(_) => section_type::VCPU,
            Section::End { .. } => section_type::END,
            Section::PostcopyPending { .. } => section_type::POSTCOPY_PENDING,
            Section::PostcopyRun => section_type::POSTCOPY_RUN,
            Section::PostcopyResume => section_type::POSTCOPY_RESUME,
            Section::Sync { .. } => section_type::SYNC,
        }
    }
}

/// Human name of a section type code, for messages.
pub fn section_name(ty: u8) -> &'static str {
    match ty {
        section_type::CONFIG => "configuration",
        section_type::RAM => "RAM",
        section_type::DEVICE => "device",
        section_type::VCPU => "vCPU",
        section_type::END => "end",
        section_type::POSTCOPY_PENDING => "post-copy pending",
        section_type::POSTCOPY_RUN => "post-copy run",
        section_type::POSTCOPY_RESUME => "post-copy resume",
        section_type::SYNC => "sync",
        _ => "unknown",
    }
}

/// Where in a stream something went wrong: a section's number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub section: u64,
    pub offset: u64,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "section #{} at byte {}", self.section, self.offset)
    }
}

/// Errors of the migration stream writer and reader.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("I/O error on the migration stream")]
    Io(#[source] io::Error),
    #[error("truncated stream while reading {what} (byte {offset})")]
    Truncated { what: &'static str, offset: u64 },
    #[error("bad magic {found:02x?}: not a dmhost migration stream")]
    BadMagic { found: [u8; 8] },
    #[error("stream header checksum mismatch")]
    HeaderChecksum,
    #[error("unsupported stream format major version {major} (this host reads {supported}.x)")]
    UnsupportedMajor { major: u16, supported: u16 },
    #[error("section header checksum mismatch in {at}")]
    SectionHeaderChecksum { at: At },
    #[error("checksum mismatch in {name} section ({at}): stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { name: &'static str, at: At, stored: u32, computed: u32 },
    #[error("unknown section type {ty:#04x} ({at}) not marked skippable")]
    UnknownSection { ty: u8, at: At },
    #[error("section type {ty:#04x} ({at}) has reserved flags {flags:#04x} or reserved bits set")]
    ReservedFlags { ty: u8, flags: u8, at: At },
    #[error("{what} length {len} exceeds limit {limit}")]
    TooLong { what: &'static str, len: u64, limit: u64 },
    #[error("malformed {section} section: {reason}")]
    Malformed { section: String, reason: String },
    #[error("expected the configuration section first, found a {found} section")]
    ConfigNotFirst { found: &'static str },
    #[error("a second configuration section ({at})")]
    DuplicateConfig { at: At },
    #[error("RAM section for block {block:?} that the configuration section does not declare")]
    UnknownRamBlock { block: String },
    #[error("page {index} of RAM block {block:?} is out of range (block has {pages} pages)")]
    PageOutOfRange { block: String, index: u64, pages: u64 },
    #[error("unknown device kind {kind:?} (instance {id:?}): not in the configuration section")]
    UnknownDevice { kind: String, id: String },
    #[error("device section version {version} of {kind:?} instance {id:?} newer than supported {supported}")]
    DeviceVersionTooNew { kind: String, id: String, version: u32, supported: u32 },
    #[error("vCPU index {index} out of range ({count} vCPUs)")]
    VcpuOutOfRange { index: u32, count: u32 },
    #[error("end section counts {stored} sections but {counted} were read")]
    SectionCount { stored: u64, counted: u64 },
    #[error("{found} section not expected here ({at}): {why}")]
    Unexpected { found: &'static str, at: At, why: &'static str },
    #[error("read past the end section")]
    AfterEnd,
    #[error("RAM batch is not the current section (already consumed or skipped)")]
    StaleBatch,
    #[error("destination memory of {len} bytes too small for page {index} of RAM block {block:?}")]
    DestinationTooSmall { block: String, index: u64, len: usize },
    #[error("RAM sink refused page {index} of block {block:?}")]
    Sink {
        block: String,
        index: u64,
        #[source]
        source: io::Error,
    },
    #[error("stream writer used out of order: {0}")]
    Order(&'static str),
}

impl StreamError {
    /// Map an I/O error while reading `what`: an early EOF is a truncation.
    pub(crate) fn read(e: io::Error, what: &'static str, offset: u64) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated { what, offset }
        } else {
            Self::Io(e)
        }
    }
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Whether `page` is all zeroes. A slice comparison against a static zero
/// page: libc's vectorised `memcmp`, which stops at the first non-zero byte.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    match ZERO_PAGE.get(..page.len()) {
        Some(z) => page == z,
        None => page.iter().all(|&b| b == 0),
    }
}

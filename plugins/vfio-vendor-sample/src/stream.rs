//! The migration data stream: what `read_migration_data` produces and
//! `write_migration_data` consumes.
//!
//! ```text
//! stream  = header record* end
//! header  = "DMVS" version:u32 page_count:u64 page_size:u32 reserved:u32   (24 bytes)
//! record  = tag:u32 len:u32 payload[len]
//!   tag 1 PAGE  payload = one page (4096 bytes; embeds its index + crc)
//!   tag 2 REGS  payload = the register block
//!   tag 3 END   payload = page_count:u64 digest:u64
//! ```
//!
//! A saving session opened by PRE_COPY sends the header, every page once
//! (the "initial" data), then pages dirtied after they were sent; once in
//! STOP_COPY it sends what is left, then REGS and END, then end of stream.
//! A session opened by STOP_COPY sends the header, every page, REGS, END.
//! Either way the destination gets exactly one header and one END.

use thiserror::Error;

use crate::pages::{verify_page, BitSet, PageError, Pages, PAGE_SIZE};

pub const STREAM_MAGIC: &[u8; 4] = b"DMVS";
pub const STREAM_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 8;
pub const PAGE_RECORD_LEN: usize = RECORD_HEADER_LEN + PAGE_SIZE;
const TAG_PAGE: u32 = 1;
const TAG_REGS: u32 = 2;
const TAG_END: u32 = 3;
const END_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("stream header magic {0:?} is not DMVS")]
    BadMagic([u8; 4]),
    #[error("stream version {0} is not supported (this driver reads {STREAM_VERSION})")]
    BadVersion(u32),
    #[error("stream is for {theirs} pages of {page_size} bytes, this device has {ours} pages of 4096")]
    Geometry { theirs: u64, page_size: u32, ours: u64 },
    #[error("record tag {tag} with length {len} is not valid")]
    BadRecord { tag: u32, len: u32 },
    #[error("page record {slot} is beyond the {count} pages")]
    PageOutOfRange { slot: u64, count: u64 },
    #[error(transparent)]
    Page(#[from] PageError),
    #[error("data after the end record")]
    AfterEnd,
    #[error("end record says {pages} pages, digest {digest:#x}; loaded state has digest {ours:#x}")]
    DigestMismatch { pages: u64, digest: u64, ours: u64 },
    #[error("stream ended before its end record ({0} bytes received)")]
    Incomplete(u64),
    #[error("register block is {0} bytes, expected {1}")]
    RegsLength(usize, usize),
    #[error("an earlier write failed; the session must be abandoned")]
    Poisoned,
}

fn record(tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn header(pages: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN);
    v.extend_from_slice(STREAM_MAGIC);
    v.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    v.extend_from_slice(&pages.to_le_bytes());
    v.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// Where the bytes waiting in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Initial,
    Dirty,
    Trailer,
}

/// A saving session (PRE_COPY / PRE_COPY_P2P / STOP_COPY).
#[derive(Debug)]
pub struct SaveSession {
    pub id: u64,
    header_pending: bool,
    initial: BitSet,
    initial_cursor: usize,
    dirty: BitSet,
    out: Vec<u8>,
    out_pos: usize,
    out_origin: Origin,
    trailer_sent: bool,
    regs_len: usize,
}

/// What one read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(usize),
    /// PRE_COPY with nothing to send now (ENOMSG).
    NothingNow,
    /// STOP_COPY stream fully read (read returns 0).
    End,
}

impl SaveSession {
    pub fn new(id: u64, pages: usize, regs_len: usize) -> Self {
        Self {
            id,
            header_pending: true,
            initial: BitSet::full(pages),
            initial_cursor: 0,
            dirty: BitSet::new(pages),
            out: Vec::new(),
            out_pos: 0,
            out_origin: Origin::Initial,
            trailer_sent: false,
            regs_len,
        }
    }

    /// Page `i` changed: send it again unless its first copy is still pending.
    pub fn page_changed(&mut self, i: usize) {
        if !self.initial.get(i) {
            self.dirty.set(i);
        }
    }

    fn out_left(&self, origin: Origin) -> u64 {
        if self.out_origin == origin {
            (self.out.len() - self.out_pos) as u64
        } else {
            0
        }
    }

    /// (initial_bytes, dirty_bytes), as `VFIO_MIG_GET_PRECOPY_INFO` reports.
    pub fn precopy_info(&self) -> (u64, u64) {
        let header = if self.header_pending { HEADER_LEN as u64 } else { 0 };
        let initial =
            header + self.initial.count() as u64 * PAGE_RECORD_LEN as u64 + self.out_left(Origin::Initial);
        let dirty = self.dirty.count() as u64 * PAGE_RECORD_LEN as u64 + self.out_left(Origin::Dirty);
        (initial, dirty)
    }

    /// Bytes a STOP_COPY read-out from here would still produce.
    pub fn remaining_stop_copy(&self) -> u64 {
        let (initial, dirty) = self.precopy_info();
        let trailer = if self.trailer_sent {
            self.out_left(Origin::Trailer)
        } else {
            trailer_len(self.regs_len) as u64
        };
        initial + dirty + trailer
    }

    /// Fill `buf`; `stop_copy` says whether the device is in STOP_COPY (only
    /// then the trailer and end of stream follow the pages).
    pub fn read(
        &mut self,
        buf: &mut [u8],
        pages: &Pages,
        stop_copy: bool,
        regs: impl Fn() -> Vec<u8>,
    ) -> ReadOutcome {
        let mut written = 0;
        while written < buf.len() {
            if self.out_pos < self.out.len() {
                let n = (self.out.len() - self.out_pos).min(buf.len() - written);
                buf[written..written + n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                written += n;
                continue;
            }
            if !self.next_record(pages, stop_copy, &regs) {
                break;
            }
        }
        match written {
            0 if stop_copy => ReadOutcome::End,
            0 => ReadOutcome::NothingNow,
            n => ReadOutcome::Data(n),
        }
    }

    /// Queue the next record in `out`; false when there is none for now.
    fn next_record(&mut self, pages: &Pages, stop_copy: bool, regs: &dyn Fn() -> Vec<u8>) -> bool {
        self.out.clear();
        self.out_pos = 0;
        if self.header_pending {
            self.header_pending = false;
            self.out = header(pages.count() as u64);
            self.out_origin = Origin::Initial;
            return true;
        }
        if let Some(i) = self.initial.next_from(self.initial_cursor) {
            self.initial.clear(i);
            self.initial_cursor = i + 1;
            self.out = record(TAG_PAGE, pages.page(i));
            self.out_origin = Origin::Initial;
            return true;
        }
        if let Some(i) = self.dirty.next_from(0) {
            self.dirty.clear(i);
            self.out = record(TAG_PAGE, pages.page(i));
            self.out_origin = Origin::Dirty;
            return true;
        }
        if stop_copy && !self.trailer_sent {
            self.trailer_sent = true;
            let mut out = record(TAG_REGS, &regs());
            let mut end = Vec::with_capacity(END_LEN);
            end.extend_from_slice(&(pages.count() as u64).to_le_bytes());
            end.extend_from_slice(&pages.digest().to_le_bytes());
            out.extend_from_slice(&record(TAG_END, &end));
            self.out = out;
            self.out_origin = Origin::Trailer;
            return true;
        }
        false
    }
}

fn trailer_len(regs_len: usize) -> usize {
    2 * RECORD_HEADER_LEN + regs_len + END_LEN
}

/// The exact size of a full STOP_COPY stream (no pre-copy) of `pages` pages.
pub fn full_stream_len(pages: usize, regs_len: usize) -> u64 {
    (HEADER_LEN + pages * PAGE_RECORD_LEN + trailer_len(regs_len)) as u64
}

/// Where the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Header,
    RecordHeader,
    Payload { tag: u32, len: usize },
    Done,
}

/// A RESUMING session: parses the stream as it arrives, split anywhere.
#[derive(Debug)]
pub struct ResumeSession {
    pub id: u64,
    expect: Expect,
    buf: Vec<u8>,
    received: u64,
    pages_seen: u64,
    regs: Option<Vec<u8>>,
    end: Option<(u64, u64)>,
    poisoned: bool,
    regs_len: usize,
}

impl ResumeSession {
    pub fn new(id: u64, regs_len: usize) -> Self {
        Self {
            id,
            expect: Expect::Header,
            buf: Vec::new(),
            received: 0,
            pages_seen: 0,
            regs: None,
            end: None,
            poisoned: false,
            regs_len,
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    fn need(&self) -> usize {
        match self.expect {
            Expect::Header => HEADER_LEN,
            Expect::RecordHeader => RECORD_HEADER_LEN,
            Expect::Payload { len, .. } => len,
            Expect::Done => 0,
        }
    }

    /// Consume `data`, storing verified pages into `pages` as they arrive.
    pub fn write(&mut self, mut data: &[u8], pages: &mut Pages) -> Result<usize, StreamError> {
        if self.poisoned {
            return Err(StreamError::Poisoned);
        }
        let total = data.len();
        while !data.is_empty() {
            if self.expect == Expect::Done {
                self.poisoned = true;
                return Err(StreamError::AfterEnd);
            }
            let take = (self.need() - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.received += take as u64;
            if self.buf.len() == self.need() {
                let element = std::mem::take(&mut self.buf);
                if let Err(e) = self.element(&element, pages) {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
        Ok(total)
    }

    fn element(&mut self, b: &[u8], pages: &mut Pages) -> Result<(), StreamError> {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        match self.expect {
            Expect::Header => {
                let magic = [b[0], b[1], b[2], b[3]];
                if &magic != STREAM_MAGIC {
                    return Err(StreamError::BadMagic(magic));
                }
                let version = u32_at(4);
                if version != STREAM_VERSION {
                    return Err(StreamError::BadVersion(version));
                }
                let (theirs, page_size) = (u64_at(8), u32_at(16));
                let ours = pages.count() as u64;
                if theirs != ours || page_size as usize != PAGE_SIZE {
                    return Err(StreamError::Geometry { theirs, page_size, ours });
                }
                self.expect = Expect::RecordHeader;
            }
            Expect::RecordHeader => {
                let (tag, len) = (u32_at(0), u32_at(4));
                let ok = match tag {
                    TAG_PAGE => len as usize == PAGE_SIZE,
                    TAG_REGS => len as usize == self.regs_len,
                    TAG_END => len as usize == END_LEN,
                    _ => false,
                };
                if !ok {
                    return Err(StreamError::BadRecord { tag, len });
                }
                self.expect = Expect::Payload { tag, len: len as usize };
            }
            Expect::Payload { tag, .. } => {
                self.expect = Expect::RecordHeader;
                match tag {
                    TAG_PAGE => {
                        let slot = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
                        let count = pages.count() as u64;
                        if slot >= count {
                            return Err(StreamError::PageOutOfRange { slot, count });
                        }
                        verify_page(b, slot)?;
                        pages.store(slot as usize, b);
                        self.pages_seen += 1;
                    }
                    TAG_REGS => {
                        if b.len() != self.regs_len {
                            return Err(StreamError::RegsLength(b.len(), self.regs_len));
                        }
                        self.regs = Some(b.to_vec());
                    }
                    _ => {
                        self.end = Some((u64_at(0), u64_at(8)));
                        self.expect = Expect::Done;
                    }
                }
            }
            Expect::Done => return Err(StreamError::AfterEnd),
        }
        Ok(())
    }

    /// RESUMING → STOP: the stream must be complete and consistent. Returns
    /// the register block to apply.
    pub fn finish(&self, pages: &Pages) -> Result<Vec<u8>, StreamError> {
        if self.poisoned {
            return Err(StreamError::Poisoned);
        }
        let (Some((count, digest)), Some(regs)) = (self.end, self.regs.as_ref()) else {
            return Err(StreamError::Incomplete(self.received));
        };
        let ours = pages.digest();
        if count != pages.count() as u64 || digest != ours {
            return Err(StreamError::DigestMismatch { pages: count, digest, ours });
        }
        Ok(regs.clone())
    }
}

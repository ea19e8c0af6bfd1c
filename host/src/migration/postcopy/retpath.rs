//! The return path: messages the destination sends back to the source on
//! the main connection during post-copy (page requests, the pages it has
//! after a reconnection, completion).
//!
//! Each message uses the stream's section framing (`type u8 | flags u8 = 0 |
//! reserved u16 = 0 | len u32 | header_crc u32 | payload | payload_crc u32`)
//! with type codes 0x81.. so that a text error line ("error: …", which a
//! destination sends before post-copy starts) is told apart by its first
//! byte. The input is untrusted: lengths are checked against limits before
//! anything is allocated, and nothing here panics.

use std::io::{self, Read, Write};

use crate::migration::{
    bitmap_words, ConfigSection, MAX_BITMAP_PAYLOAD, MAX_PAGES_PER_BATCH, MAX_STRING_LEN, PAGE_INDEX_MASK,
    SECTION_HEADER_LEN,
};

/// Return-path message type codes.
pub mod msg_type {
    /// `block str | count u32 (1..=1024) | page index u64 × count`
    pub const REQUEST: u8 = 0x81;
    /// `block str | bitmap u64 × ceil(pages/64)`: pages the destination has.
    pub const RECEIVED: u8 = 0x82;
    /// Empty: every RECEIVED bitmap was sent; the source may continue.
    pub const RESUME_READY: u8 = 0x83;
    /// Empty: every page arrived; the migration is complete.
    pub const COMPLETE: u8 = 0x84;
    /// Empty: device and vCPU state loaded, RAM registered with
    /// userfaultfd; the source may send the run section.
    pub const READY: u8 = 0x85;
}

const MAX_REQUEST_PAYLOAD: u32 = (1 + MAX_STRING_LEN + 4 + 8 * MAX_PAGES_PER_BATCH) as u32;

/// A return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetMsg {
    Request { block: String, pages: Vec<u64> },
    Received { block: String, bitmap: Vec<u64> },
    ResumeReady,
    Complete,
    Ready,
}

/// Why a return-path message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RetPathError {
    #[error("return path I/O")]
    Io(#[from] io::Error),
    #[error("the destination reported an error: {0}")]
    Remote(String),
    #[error("return path closed")]
    Closed,
    #[error("malformed return-path message: {0}")]
    Malformed(String),
}

fn bad(s: impl Into<String>) -> RetPathError {
    RetPathError::Malformed(s.into())
}

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SECTION_HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(&[ty, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out
}

fn put_str(p: &mut Vec<u8>, s: &str) -> Result<(), RetPathError> {
    if s.len() > MAX_STRING_LEN {
        return Err(bad("block id too long"));
    }
    p.push(s.len() as u8);
    p.extend_from_slice(s.as_bytes());
    Ok(())
}

impl RetMsg {
    /// The framed bytes of the message.
    pub fn encode(&self) -> Result<Vec<u8>, RetPathError> {
        let mut p = Vec::new();
        let ty = match self {
            RetMsg::Request { block, pages } => {
                if pages.is_empty() || pages.len() > MAX_PAGES_PER_BATCH {
                    return Err(bad("request of 0 or too many pages"));
                }
                put_str(&mut p, block)?;
                p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                for i in pages {
                    p.extend_from_slice(&i.to_le_bytes());
                }
                msg_type::REQUEST
            }
            RetMsg::Received { block, bitmap } => {
                put_str(&mut p, block)?;
                for w in bitmap {
                    p.extend_from_slice(&w.to_le_bytes());
                }
                if p.len() > MAX_BITMAP_PAYLOAD as usize {
                    return Err(bad("received bitmap too large"));
                }
                msg_type::RECEIVED
            }
            RetMsg::ResumeReady => msg_type::RESUME_READY,
            RetMsg::Complete => msg_type::COMPLETE,
            RetMsg::Ready => msg_type::READY,
        };
        Ok(frame(ty, &p))
    }

    /// Write the message and flush.
    pub fn send(&self, w: &mut impl Write) -> Result<(), RetPathError> {
        w.write_all(&self.encode()?)?;
        w.flush()?;
        Ok(())
    }

    /// Read one message, checked against `config` (blocks and page ranges).
    /// Text lines come before post-copy: "error: …" ends the read with the
    /// destination's reason; a late "synced …" answer is skipped.
    pub fn read(r: &mut impl Read, config: &ConfigSection) -> Result<Self, RetPathError> {
        let mut h = [0u8; SECTION_HEADER_LEN];
        loop {
            match r.read(&mut h[..1])? {
                0 => return Err(RetPathError::Closed),
                b if h[0].is_ascii_lowercase() => {
                    let line = read_line_rest(r, h[..b].to_vec())?;
                    if let Some(why) = line.strip_prefix("error: ") {
                        return Err(RetPathError::Remote(why.to_owned()));
                    }
                    if !line.starts_with(crate::migration::source::SYNCED) {
                        return Err(bad(format!("unexpected line {line:?}")));
                    }
                }
                _ => break,
            }
        }
        r.read_exact(&mut h[1..]).map_err(eof)?;
        let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if crc32c::crc32c(&h[..8]) != crc {
            return Err(bad("header checksum mismatch"));
        }
        let (ty, flags, reserved) = (h[0], h[1], u16::from_le_bytes([h[2], h[3]]));
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if flags != 0 || reserved != 0 {
            return Err(bad(format!("type {ty:#04x} has reserved bits set")));
        }
        let limit = match ty {
            msg_type::REQUEST => MAX_REQUEST_PAYLOAD,
            msg_type::RECEIVED => MAX_BITMAP_PAYLOAD,
            msg_type::RESUME_READY | msg_type::COMPLETE | msg_type::READY => 0,
            _ => return Err(bad(format!("unknown message type {ty:#04x}"))),
        };
        if len > limit {
            return Err(bad(format!("type {ty:#04x} payload of {len} bytes exceeds {limit}")));
        }
        let mut payload = Vec::with_capacity((len as usize).min(64 << 10));
        let n = r.take(u64::from(len)).read_to_end(&mut payload)?;
        if n != len as usize {
            return Err(RetPathError::Closed);
        }
        let mut c = [0u8; 4];
        r.read_exact(&mut c).map_err(eof)?;
        if crc32c::crc32c(&payload) != u32::from_le_bytes(c) {
            return Err(bad("payload checksum mismatch"));
        }
        parse(ty, &payload, config)
    }
}

/// Longest text line on the return path.
const MAX_LINE: usize = 4096;

/// Read a text line whose first bytes are `line`, up to its newline (not
/// kept), a byte at a time: nothing after the line is consumed, so binary
/// messages that follow stay in the socket.
pub fn read_line_rest(r: &mut impl Read, mut line: Vec<u8>) -> io::Result<String> {
    let mut b = [0u8; 1];
    while line.len() < MAX_LINE && r.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn eof(e: io::Error) -> RetPathError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        RetPathError::Closed
    } else {
        RetPathError::Io(e)
    }
}

fn parse(ty: u8, p: &[u8], config: &ConfigSection) -> Result<RetMsg, RetPathError> {
    if ty == msg_type::RESUME_READY {
        return Ok(RetMsg::ResumeReady);
    }
    if ty == msg_type::COMPLETE {
        return Ok(RetMsg::Complete);
    }
    if ty == msg_type::READY {
        return Ok(RetMsg::Ready);
    }
    let n = *p.first().ok_or_else(|| bad("empty payload"))? as usize;
    let id = p.get(1..1 + n).ok_or_else(|| bad("truncated block id"))?;
    let block = String::from_utf8(id.to_vec()).map_err(|_| bad("block id is not UTF-8"))?;
    let pages = config
        .ram_block(&block)
        .map(|b| b.pages())
        .ok_or_else(|| bad(format!("unknown RAM block {block:?}")))?;
    let rest = &p[1 + n..];
    if ty == msg_type::REQUEST {
        let count = rest
            .get(..4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .ok_or_else(|| bad("truncated count"))?;
        let count = count as usize;
        if count == 0 || count > MAX_PAGES_PER_BATCH || rest.len() != 4 + 8 * count {
            return Err(bad(format!("request of {count} pages in {} bytes", rest.len())));
        }
        let mut out = Vec::with_capacity(count);
        for e in rest[4..].chunks_exact(8) {
            let i = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if i & !PAGE_INDEX_MASK != 0 || i >= pages {
                return Err(bad(format!("request for page {i} of {block:?} ({pages} pages)")));
            }
            out.push(i);
        }
        return Ok(RetMsg::Request { block, pages: out });
    }
    if rest.len() as u64 != bitmap_words(pages) * 8 {
        return Err(bad(format!("bitmap of {} bytes for {pages} pages of {block:?}", rest.len())));
    }
    let bitmap = rest
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]))
        .collect();
    Ok(RetMsg::Received { block, bitmap })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::RamBlockInfo;

    fn config() -> ConfigSection {
        ConfigSection {
            ram_size: 1 << 20,
            vcpus: 1,
            ram_blocks: vec![RamBlockInfo { id: "ram0".into(), size: 1 << 20 }],
            devices: vec![],
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        let c = config();
        let msgs = [
            RetMsg::Request { block: "ram0".into(), pages: vec![0, 5, 255] },
            RetMsg::Received { block: "ram0".into(), bitmap: vec![7, 0, 0, 1 << 63] },
            RetMsg::ResumeReady,
            RetMsg::Complete,
            RetMsg::Ready,
        ];
        for m in &msgs {
            let bytes = m.encode().unwrap();
            assert_eq!(&RetMsg::read(&mut &bytes[..], &c).unwrap(), m);
            for cut in 0..bytes.len() {
                assert!(RetMsg::read(&mut &bytes[..cut], &c).is_err(), "{m:?} cut at {cut}");
            }
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                // A flip of the first byte to 'e' reads as an error line.
                assert!(RetMsg::read(&mut &b[..], &c).is_err(), "{m:?} bit {bit}");
            }
        }
        let out_of_range = RetMsg::Request { block: "ram0".into(), pages: vec![256] }.encode().unwrap();
        assert!(RetMsg::read(&mut &out_of_range[..], &c).is_err());
        let unknown = RetMsg::Request { block: "nope".into(), pages: vec![1] }.encode().unwrap();
        assert!(RetMsg::read(&mut &unknown[..], &c).is_err());
        match RetMsg::read(&mut &b"error: no space\n"[..], &c) {
            Err(RetPathError::Remote(m)) => assert_eq!(m, "no space"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_late_sync_answer_is_skipped_and_other_lines_refused() {
        let c = config();
        let mut b = b"synced 3\n".to_vec();
        b.extend(RetMsg::Ready.encode().unwrap());
        let mut r = &b[..];
        assert_eq!(RetMsg::read(&mut r, &c).unwrap(), RetMsg::Ready);
        assert!(r.is_empty());
        assert!(matches!(RetMsg::read(&mut &b"hello\n"[..], &c), Err(RetPathError::Malformed(_))));
        assert!(matches!(RetMsg::read(&mut &b"synced 3\n"[..], &c), Err(RetPathError::Closed)));
    }
}

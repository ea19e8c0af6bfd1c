//! The internal state: pages that embed their index, a generation counter
//! and a checksum, so a migrated copy can be verified page by page.
//!
//! Page layout (little endian):
//! `[0,8)` index, `[8,16)` generation, `[16,4088)` payload derived from
//! (index, generation), `[4088,4092)` CRC32C of `[0,4088)`, `[4092,4096)`
//! [`PAGE_MAGIC`].

use thiserror::Error;

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_MAGIC: u32 = 0x5047_4453; // "SDGP"
const CRC_AT: usize = 4088;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PageError {
    #[error("page {index}: bad magic {magic:#x}")]
    BadMagic { index: u64, magic: u32 },
    #[error("page {index}: checksum {found:#x} does not match its content ({expected:#x})")]
    BadChecksum { index: u64, found: u32, expected: u32 },
    #[error("page record for slot {slot} carries index {index}")]
    WrongIndex { slot: u64, index: u64 },
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Fill `page` with generation `gen` of page `index`.
pub fn fill_page(page: &mut [u8], index: u64, gen: u64) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    page[0..8].copy_from_slice(&index.to_le_bytes());
    page[8..16].copy_from_slice(&gen.to_le_bytes());
    let seed = index.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ gen.rotate_left(32);
    for (w, chunk) in page[16..CRC_AT].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix(seed ^ w as u64).to_le_bytes());
    }
    let crc = crc32c::crc32c(&page[..CRC_AT]);
    page[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    page[CRC_AT + 4..].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
}

/// The (index, generation, crc) a page claims.
pub fn page_header(page: &[u8]) -> (u64, u64, u32) {
    (u64_at(page, 0), u64_at(page, 8), u32_at(page, CRC_AT))
}

/// Check a page's magic, checksum and that it is page `slot`.
pub fn verify_page(page: &[u8], slot: u64) -> Result<(), PageError> {
    let (index, _, crc) = page_header(page);
    let magic = u32_at(page, CRC_AT + 4);
    if magic != PAGE_MAGIC {
        return Err(PageError::BadMagic { index, magic });
    }
    let expected = crc32c::crc32c(&page[..CRC_AT]);
    if crc != expected {
        return Err(PageError::BadChecksum { index, found: crc, expected });
    }
    if index != slot {
        return Err(PageError::WrongIndex { slot, index });
    }
    Ok(())
}

/// The state: `n` pages, each valid at all times.
pub struct Pages {
    data: Vec<u8>,
}

impl Pages {
    pub fn new(count: usize) -> Self {
        let mut data = vec![0u8; count * PAGE_SIZE];
        for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            fill_page(page, i as u64, 0);
        }
        Self { data }
    }

    pub fn count(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }

    pub fn page(&self, i: usize) -> &[u8] {
        &self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    /// Overwrite page `i` with migrated bytes (already verified).
    pub fn store(&mut self, i: usize, bytes: &[u8]) {
        self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(bytes);
    }

    pub fn generation(&self, i: usize) -> u64 {
        page_header(self.page(i)).1
    }

    /// Advance page `i` to its next generation.
    pub fn bump(&mut self, i: usize) {
        let gen = self.generation(i).wrapping_add(1);
        fill_page(&mut self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], i as u64, gen);
    }

    /// A digest over every page's (index, generation, crc).
    pub fn digest(&self) -> u64 {
        self.data.chunks_exact(PAGE_SIZE).fold(0xcbf2_9ce4_8422_2325u64, |h, p| {
            let (index, gen, crc) = page_header(p);
            splitmix(h ^ index ^ gen.rotate_left(17) ^ (u64::from(crc) << 24))
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// A fixed-size bit set with a population count.
#[derive(Debug, Clone, Default)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
    ones: usize,
}

impl BitSet {
    pub fn new(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(64)], len, ones: 0 }
    }
    pub fn full(len: usize) -> Self {
        let mut s = Self::new(len);
        for i in 0..len {
            s.set(i);
        }
        s
    }
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }
    pub fn set(&mut self, i: usize) {
        if i < self.len && !self.get(i) {
            self.words[i / 64] |= 1 << (i % 64);
            self.ones += 1;
        }
    }
    pub fn clear(&mut self, i: usize) {
        if self.get(i) {
            self.words[i / 64] &= !(1 << (i % 64));
            self.ones -= 1;
        }
    }
    pub fn count(&self) -> usize {
        self.ones
    }
    /// The first set bit at or after `from`.
    pub fn next_from(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut w = from / 64;
        let mut bits = self.words[w] & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = self.words[w];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_verify_and_detect_corruption() {
        let mut p = Pages::new(4);
        for i in 0..4 {
            verify_page(p.page(i), i as u64).unwrap();
        }
        let d0 = p.digest();
        p.bump(2);
        assert_eq!(p.generation(2), 1);
        verify_page(p.page(2), 2).unwrap();
        assert_ne!(p.digest(), d0);
        let mut bad = p.page(1).to_vec();
        bad[100] ^= 1;
        assert!(matches!(verify_page(&bad, 1), Err(PageError::BadChecksum { .. })));
        assert!(matches!(verify_page(p.page(1), 3), Err(PageError::WrongIndex { .. })));
    }

    #[test]
    fn bitset_counts_and_scans() {
        let mut b = BitSet::new(130);
        b.set(3);
        b.set(3);
        b.set(129);
        b.set(500);
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_from(0), Some(3));
        assert_eq!(b.next_from(4), Some(129));
        b.clear(129);
        assert_eq!(b.next_from(4), None);
        assert_eq!(BitSet::full(70).count(), 70);
    }
}

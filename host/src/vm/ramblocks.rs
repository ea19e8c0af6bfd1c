//! The RAM registry: every block of host memory that backs guest memory and
//! must migrate (guest RAM, device-registered RAM), with a software dirty
//! bitmap for writes KVM's dirty log cannot see (device writes, host DMA).

use std::collections::BTreeMap;

use super::memory::PAGE_SIZE;
use super::physmap::Owner;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamRegistryError {
    #[error("RAM block {0:?} is already registered")]
    Duplicate(String),
    #[error("RAM block {0:?} is not registered")]
    Unknown(String),
    #[error("RAM block {name:?} belongs to {owner}")]
    NotOwner { name: String, owner: Owner },
    #[error("range {offset:#x}+{len:#x} is outside RAM block {name:?} ({size:#x} bytes)")]
    OutOfRange { name: String, offset: u64, len: u64, size: u64 },
    #[error("RAM block {name:?} is empty or not page aligned")]
    BadBlock { name: String },
}

/// A block of memory that migrates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    pub name: String,
    pub owner: Owner,
    /// Address of the block in this process.
    pub host_addr: u64,
    pub size: u64,
    /// Descriptor backing it (memfd or file), or -1; owned by `owner`.
    pub fd: i32,
    pub fd_offset: u64,
}

struct Entry {
    block: RamBlock,
    soft_dirty: Vec<u64>,
}

/// Registered RAM blocks by name.
#[derive(Default)]
pub struct RamRegistry {
    blocks: BTreeMap<String, Entry>,
}

fn pages(size: u64) -> usize {
    size.div_ceil(PAGE_SIZE) as usize
}

impl RamRegistry {
    pub fn register(&mut self, block: RamBlock) -> Result<(), RamRegistryError> {
        if block.size == 0
            || !block.size.is_multiple_of(PAGE_SIZE)
            || !block.host_addr.is_multiple_of(PAGE_SIZE)
        {
            return Err(RamRegistryError::BadBlock { name: block.name });
        }
        if self.blocks.contains_key(&block.name) {
            return Err(RamRegistryError::Duplicate(block.name));
        }
        let soft_dirty = vec![0; pages(block.size).div_ceil(64)];
        self.blocks.insert(block.name.clone(), Entry { block, soft_dirty });
        Ok(())
    }

    pub fn unregister(&mut self, name: &str, owner: &Owner) -> Result<RamBlock, RamRegistryError> {
        let e = self.blocks.get(name).ok_or_else(|| RamRegistryError::Unknown(name.to_owned()))?;
        if &e.block.owner != owner {
            return Err(RamRegistryError::NotOwner { name: name.to_owned(), owner: e.block.owner.clone() });
        }
        self.blocks.remove(name).map(|e| e.block).ok_or_else(|| RamRegistryError::Unknown(name.to_owned()))
    }

    /// Drop every block of `owner`.
    pub fn unregister_owner(&mut self, owner: &Owner) -> Vec<RamBlock> {
        let names: Vec<String> =
            self.blocks.values().filter(|e| &e.block.owner == owner).map(|e| e.block.name.clone()).collect();
        names.iter().filter_map(|n| self.blocks.remove(n)).map(|e| e.block).collect()
    }

    /// Mark `[offset, offset+len)` of block `name` dirty on behalf of `owner`.
    pub fn mark_dirty(
        &mut self,
        name: &str,
        owner: &Owner,
        offset: u64,
        len: u64,
    ) -> Result<(), RamRegistryError> {
        let e = self.blocks.get_mut(name).ok_or_else(|| RamRegistryError::Unknown(name.to_owned()))?;
        if &e.block.owner != owner {
            return Err(RamRegistryError::NotOwner { name: name.to_owned(), owner: e.block.owner.clone() });
        }
        let size = e.block.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RamRegistryError::OutOfRange { name: name.to_owned(), offset, len, size });
        }
        set_bits(&mut e.soft_dirty, offset, len);
        Ok(())
    }

    /// Mark dirty whatever blocks cover host range `[addr, addr+len)`.
    pub fn mark_dirty_host(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        for e in self.blocks.values_mut() {
            let b_end = e.block.host_addr + e.block.size;
            if addr < b_end && end > e.block.host_addr {
                let from = addr.max(e.block.host_addr) - e.block.host_addr;
                let to = end.min(b_end) - e.block.host_addr;
                set_bits(&mut e.soft_dirty, from, to - from);
            }
        }
    }

    /// Take (and clear) the software dirty bitmap of `name`: one bit per page.
    pub fn take_soft_dirty(&mut self, name: &str) -> Result<Vec<u64>, RamRegistryError> {
        let e = self.blocks.get_mut(name).ok_or_else(|| RamRegistryError::Unknown(name.to_owned()))?;
        let n = e.soft_dirty.len();
        Ok(std::mem::replace(&mut e.soft_dirty, vec![0; n]))
    }

    pub fn get(&self, name: &str) -> Option<RamBlock> {
        self.blocks.get(name).map(|e| e.block.clone())
    }

    pub fn list(&self) -> Vec<RamBlock> {
        self.blocks.values().map(|e| e.block.clone()).collect()
    }
}

fn set_bits(bitmap: &mut [u64], offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = offset / PAGE_SIZE;
    let last = (offset + len - 1) / PAGE_SIZE;
    for p in first..=last {
        if let Some(w) = bitmap.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(name: &str, owner: Owner, host: u64) -> RamBlock {
        RamBlock { name: name.into(), owner, host_addr: host, size: 16 * PAGE_SIZE, fd: -1, fd_offset: 0 }
    }

    #[test]
    fn registry_owner_checks_and_dirty_bits() {
        let a = Owner::Device("a".into());
        let mut r = RamRegistry::default();
        r.register(block("a/ram", a.clone(), 0x10000)).unwrap();
        assert_eq!(
            r.register(block("a/ram", a.clone(), 0x10000)),
            Err(RamRegistryError::Duplicate("a/ram".into()))
        );
        assert!(r.mark_dirty("a/ram", &Owner::Host, 0, 1).is_err());
        assert!(r.mark_dirty("a/ram", &a, 15 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
        r.mark_dirty("a/ram", &a, PAGE_SIZE - 1, 2).unwrap();
        r.mark_dirty_host(0x10000 + 5 * PAGE_SIZE, 1);
        assert_eq!(r.take_soft_dirty("a/ram").unwrap(), vec![0b100011]);
        assert_eq!(r.take_soft_dirty("a/ram").unwrap(), vec![0]);
        assert!(r.unregister("a/ram", &Owner::Host).is_err());
        assert_eq!(r.unregister_owner(&a).len(), 1);
        assert!(r.list().is_empty());
    }
}

//! A pre-flight check of a shared library file before `dlopen` sees it.
//!
//! `dlopen` maps segments as the program headers describe them; a file cut
//! short maps pages past its end and the first touch is a SIGBUS that kills
//! the host. Checking the headers against the file size first turns that
//! into a clear error.

use std::{fs::File, io::Read, path::Path};

/// Why a file is not a loadable 64-bit ELF shared object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("cannot read file: {0}")]
    Unreadable(String),
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF shared object")]
    WrongClass,
    #[error("truncated: {what} ends at byte {end} but the file has {size} bytes")]
    Truncated { what: String, end: u64, size: u64 },
}

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const ET_DYN: u16 = 3;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Check that `path` is an x86-64 style ELF64 shared object whose program
/// headers and loadable segments lie inside the file.
pub fn check_shared_object(path: &Path) -> Result<(), ElfError> {
    let unreadable = |e: std::io::Error| ElfError::Unreadable(e.to_string());
    let mut file = File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    let mut ehdr = [0u8; EHDR_LEN];
    let got = read_up_to(&mut file, &mut ehdr).map_err(unreadable)?;
    if got < 4 || &ehdr[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if got < EHDR_LEN {
        return Err(ElfError::Truncated { what: "ELF header".into(), end: EHDR_LEN as u64, size });
    }
    if ehdr[4] != 2 || ehdr[5] != 1 || u16_at(&ehdr, 16) != ET_DYN {
        return Err(ElfError::WrongClass);
    }
    let phoff = u64_at(&ehdr, 32);
    let shoff = u64_at(&ehdr, 40);
    let phentsize = u16_at(&ehdr, 54) as u64;
    let phnum = u16_at(&ehdr, 56) as u64;
    let shentsize = u16_at(&ehdr, 58) as u64;
    let shnum = u16_at(&ehdr, 60) as u64;
    let within = |what: &str, start: u64, len: u64| {
        let end = start.saturating_add(len);
        if end > size {
            Err(ElfError::Truncated { what: what.into(), end, size })
        } else {
            Ok(())
        }
    };
    if phentsize as usize != PHDR_LEN {
        return Err(ElfError::WrongClass);
    }
    within("program header table", phoff, phentsize * phnum)?;
    within("section header table", shoff, shentsize.saturating_mul(shnum))?;
    let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(phoff)).map_err(unreadable)?;
    file.read_exact(&mut phdrs).map_err(unreadable)?;
    for (i, ph) in phdrs.chunks_exact(PHDR_LEN).enumerate() {
        if u32_at(ph, 0) == PT_LOAD {
            within(&format!("loadable segment {i}"), u64_at(ph, 8), u64_at(ph, 32))?;
        }
    }
    Ok(())
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_real_library_and_rejects_cut_copies() {
        let exe = std::env::current_exe().unwrap();
        // The test binary is an ELF executable (PIE, so ET_DYN) with loads.
        let data = std::fs::read(&exe).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole");
        std::fs::write(&whole, &data).unwrap();
        assert_eq!(check_shared_object(&whole), Ok(()));
        for cut in [0, 3, 40, 4096, data.len() / 2, data.len() - 1] {
            let p = dir.path().join(format!("cut{cut}"));
            std::fs::write(&p, &data[..cut]).unwrap();
            assert!(check_shared_object(&p).is_err(), "cut at {cut} accepted");
        }
        let text = dir.path().join("text");
        std::fs::write(&text, b"hello world, not a library").unwrap();
        assert_eq!(check_shared_object(&text), Err(ElfError::NotElf));
    }
}

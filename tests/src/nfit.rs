//! Structural check of NFIT sub-structures (ACPI 6.x, 5.2.25).

/// Fixed lengths of the sub-structure types that have one.
fn fixed_len(ty: u16) -> Option<u16> {
    match ty {
        0 => Some(56), // SPA range
        1 => Some(48), // memory device to SPA range map
        7 => Some(16), // platform capabilities
        _ => None,
    }
}

/// Every sub-structure has a consistent type/length header, the headers
/// tile the buffer exactly, and fixed-size types have their size.
pub fn check_nfit(buf: &[u8]) -> Result<(), String> {
    let mut off = 0usize;
    while off < buf.len() {
        let hdr = buf.get(off..off + 4).ok_or(format!("truncated sub-structure header at {off}"))?;
        let ty = u16::from_le_bytes([hdr[0], hdr[1]]);
        let len = u16::from_le_bytes([hdr[2], hdr[3]]);
        if ty > 7 {
            return Err(format!("unknown NFIT sub-structure type {ty} at {off}"));
        }
        if len < 4 || off + len as usize > buf.len() {
            return Err(format!(
                "sub-structure type {ty} at {off} has length {len}, buffer has {}",
                buf.len() - off
            ));
        }
        if let Some(want) = fixed_len(ty) {
            if len != want {
                return Err(format!("sub-structure type {ty} at {off} has length {len}, expected {want}"));
            }
        }
        if ty == 4 && len != 80 && len != 32 {
            return Err(format!("control region at {off} has length {len}, expected 80 or 32"));
        }
        off += len as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_and_lengths() {
        let mut spa = vec![0u8; 56];
        spa[2] = 56;
        assert_eq!(check_nfit(&spa), Ok(()));
        assert!(check_nfit(&spa[..50]).is_err());
        let mut bad = spa.clone();
        bad[2] = 40;
        assert!(check_nfit(&bad).is_err());
        let mut unknown = spa.clone();
        unknown[0] = 9;
        assert!(check_nfit(&unknown).is_err());
        assert_eq!(check_nfit(&[]), Ok(()));
    }
}

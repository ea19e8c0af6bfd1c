//! The iohub's migrating state: each line's route and the sources holding
//! it. A line held on the source is held on the destination (the device
//! re-raises held lines after loading).
//!
//! Version 1, little endian, per line ([`NUM_LINES`]):
//! `route: u8` (GSI, or 0xff for none), `count: u8`, then `count` times
//! `devfn: u8, pin: u8`.

use std::collections::BTreeSet;

use crate::lines::{Source, NUM_LINES};

pub const STATE_VERSION: u32 = 1;
const NO_ROUTE: u8 = 0xff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("iohub state version {0} is newer than supported {STATE_VERSION}")]
    Version(u32),
    #[error("iohub state is truncated at byte {0}")]
    Truncated(usize),
    #[error("iohub state has {0} trailing bytes")]
    Trailing(usize),
    #[error("iohub state: line {line} routed to GSI {gsi}, past {max}")]
    Gsi { line: usize, gsi: u8, max: u32 },
    #[error("iohub state: line {line} source pin {pin} is not 1..=4")]
    Pin { line: usize, pin: u8 },
    #[error("iohub state: line {line} lists a source twice")]
    Duplicate { line: usize },
}

/// One line's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineSnapshot {
    pub gsi: Option<u32>,
    pub held: BTreeSet<Source>,
}

pub fn encode(lines: &[LineSnapshot]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in lines {
        v.push(l.gsi.and_then(|g| u8::try_from(g).ok()).unwrap_or(NO_ROUTE));
        v.push(l.held.len().min(255) as u8);
        for s in l.held.iter().take(255) {
            v.extend([s.devfn, s.pin]);
        }
    }
    v
}

/// Decode untrusted bytes; `max_gsi` bounds the routes.
pub fn decode(version: u32, data: &[u8], max_gsi: u32) -> Result<Vec<LineSnapshot>, StateError> {
    if version > STATE_VERSION || version == 0 {
        return Err(StateError::Version(version));
    }
    let mut at = 0;
    let next = |at: &mut usize| -> Result<u8, StateError> {
        let b = *data.get(*at).ok_or(StateError::Truncated(*at))?;
        *at += 1;
        Ok(b)
    };
    let mut out = Vec::with_capacity(NUM_LINES);
    for line in 0..NUM_LINES {
        let route = next(&mut at)?;
        let gsi = match route {
            NO_ROUTE => None,
            g if u32::from(g) < max_gsi => Some(u32::from(g)),
            g => return Err(StateError::Gsi { line, gsi: g, max: max_gsi }),
        };
        let count = next(&mut at)?;
        let mut held = BTreeSet::new();
        for _ in 0..count {
            let devfn = next(&mut at)?;
            let pin = next(&mut at)?;
            if !(1..=4).contains(&pin) {
                return Err(StateError::Pin { line, pin });
            }
            if !held.insert(Source { devfn, pin }) {
                return Err(StateError::Duplicate { line });
            }
        }
        out.push(LineSnapshot { gsi, held });
    }
    if at != data.len() {
        return Err(StateError::Trailing(data.len() - at));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<LineSnapshot> {
        let mut v = vec![LineSnapshot::default(); NUM_LINES];
        v[0].gsi = Some(16);
        v[1].gsi = Some(5);
        v[1].held.insert(Source { devfn: 8, pin: 1 });
        v[1].held.insert(Source { devfn: 0x21, pin: 4 });
        v
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode(1, &encode(&s), 24).unwrap(), s);
    }

    #[test]
    fn rejects_bad_state_without_panicking() {
        let good = encode(&sample());
        assert_eq!(decode(2, &good, 24), Err(StateError::Version(2)));
        for n in 0..good.len() {
            assert!(decode(1, &good[..n], 24).is_err(), "truncated at {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(1, &long, 24), Err(StateError::Trailing(1)));
        let mut bad_gsi = good.clone();
        bad_gsi[0] = 30;
        assert!(matches!(decode(1, &bad_gsi, 24), Err(StateError::Gsi { .. })));
        let mut bad_pin = good.clone();
        bad_pin[5] = 9;
        assert!(matches!(decode(1, &bad_pin, 24), Err(StateError::Pin { .. })));
        let mut x: u64 = 0x1234_5678;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(1, &junk, 24);
        }
    }
}

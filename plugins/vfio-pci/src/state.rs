//! VFIO migration v2 device states and transitions, shared by the kernel
//! and vendor backends.
//!
//! The FSM itself (states, the uAPI's arcs, the kernel's
//! `vfio_mig_get_next_state`) lives in `dmhost_plugin_api::vfio`, because
//! vendor driver plugins and the conformance suite need exactly the same
//! table; this module plans whole transitions over it.

pub use dmhost_plugin_api::vfio::{is_arc, next_state, MigState};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{0} is not a VFIO migration state")]
    Unknown(u32),
    #[error("{from} -> {to} is not allowed for migration flags {flags:#x}")]
    NotAllowed { from: MigState, to: MigState, flags: u64 },
}

/// Decode a uAPI state value.
pub fn decode(raw: u32) -> Result<MigState, StateError> {
    MigState::from_raw(raw).ok_or(StateError::Unknown(raw))
}

/// The arcs (each a single driver step) from `from` to `to`, shortest path
/// first as the kernel walks it; empty when already there.
pub fn path(from: MigState, to: MigState, flags: u64) -> Result<Vec<MigState>, StateError> {
    if !from.supported(flags) || !to.supported(flags) {
        return Err(StateError::NotAllowed { from, to, flags });
    }
    let mut steps = Vec::new();
    let mut cur = from;
    while cur != to {
        let next = next_state(cur, to, flags).ok_or(StateError::NotAllowed { from, to, flags })?;
        steps.push(next);
        cur = next;
        if steps.len() > MigState::ALL.len() {
            return Err(StateError::NotAllowed { from, to, flags });
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use dmhost_plugin_api::vfio::{
        arc_opens_stream, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
    };
    use MigState::*;

    use super::*;

    const SC: u64 = VFIO_MIGRATION_STOP_COPY;
    const ALL_FLAGS: u64 = SC | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
    const FLAG_SETS: [u64; 4] = [SC, SC | VFIO_MIGRATION_P2P, SC | VFIO_MIGRATION_PRE_COPY, ALL_FLAGS];

    /// The arcs a driver implements, from the comment above the kernel's
    /// `vfio_mig_get_next_state` (all optional features supported).
    const ARCS_ALL: [(MigState, MigState); 15] = [
        (Resuming, Stop),
        (Stop, Resuming),
        (Stop, StopCopy),
        (StopCopy, Stop),
        (Running, RunningP2p),
        (RunningP2p, Running),
        (RunningP2p, Stop),
        (Stop, RunningP2p),
        (PreCopy, Running),
        (PreCopy, PreCopyP2p),
        (PreCopyP2p, PreCopy),
        (PreCopyP2p, RunningP2p),
        (PreCopyP2p, StopCopy),
        (Running, PreCopy),
        (RunningP2p, PreCopyP2p),
    ];

    #[test]
    fn arcs_with_every_feature_match_the_kernel_list() {
        for from in MigState::ALL {
            for to in MigState::ALL {
                let expected = ARCS_ALL.contains(&(from, to));
                assert_eq!(is_arc(from, to, ALL_FLAGS), expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn arcs_without_optional_features() {
        // STOP_COPY only: RUNNING <-> STOP direct.
        assert!(is_arc(Running, Stop, SC));
        assert!(is_arc(Stop, Running, SC));
        assert!(!is_arc(Running, RunningP2p, SC));
        // PRE_COPY without P2P: PRE_COPY -> STOP_COPY is one arc.
        let pc = SC | VFIO_MIGRATION_PRE_COPY;
        assert!(is_arc(PreCopy, StopCopy, pc));
        assert!(is_arc(Running, PreCopy, pc));
        assert!(is_arc(PreCopy, Running, pc));
        assert!(!is_arc(PreCopy, Stop, pc));
    }

    /// Every pair of states under every flag set: the walk is legal step by
    /// step, never passes through a saving state in its interior, reaches
    /// the target, and refuses exactly what the uAPI refuses.
    #[test]
    fn every_pair_every_flag_set() {
        for flags in FLAG_SETS {
            for from in MigState::ALL {
                for to in MigState::ALL {
                    let r = path(from, to, flags);
                    let refused = from == Error
                        || to == Error
                        || !from.supported(flags)
                        || !to.supported(flags)
                        || (from == StopCopy && matches!(to, PreCopy | PreCopyP2p));
                    if refused {
                        assert!(r.is_err(), "{from} -> {to} flags {flags:#x} should be refused: {r:?}");
                        continue;
                    }
                    let steps = r.unwrap_or_else(|e| panic!("{from} -> {to} flags {flags:#x}: {e}"));
                    assert_eq!(steps.last().copied().unwrap_or(from), to);
                    let mut cur = from;
                    for (i, &s) in steps.iter().enumerate() {
                        assert!(is_arc(cur, s, flags), "{cur} -> {s} in {from} -> {to} ({flags:#x})");
                        assert!(s.supported(flags));
                        // Saving states are interior only within one session
                        // (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY).
                        if i + 1 < steps.len() && s.is_saving() {
                            assert!(
                                from.is_saving() && to.is_saving(),
                                "saving state {s} inside {from} -> {to}"
                            );
                        }
                        cur = s;
                    }
                    assert!(steps.len() <= 4, "{from} -> {to}: {steps:?}");
                }
            }
        }
    }

    #[test]
    fn known_combination_paths() {
        assert_eq!(path(Running, StopCopy, ALL_FLAGS).unwrap(), [RunningP2p, Stop, StopCopy]);
        assert_eq!(path(Running, StopCopy, SC).unwrap(), [Stop, StopCopy]);
        assert_eq!(path(PreCopy, StopCopy, ALL_FLAGS).unwrap(), [PreCopyP2p, StopCopy]);
        assert_eq!(path(Resuming, PreCopy, ALL_FLAGS).unwrap(), [Stop, RunningP2p, Running, PreCopy]);
        assert_eq!(path(StopCopy, Running, ALL_FLAGS).unwrap(), [Stop, RunningP2p, Running]);
        assert!(path(StopCopy, PreCopy, ALL_FLAGS).is_err());
        assert!(path(Running, PreCopy, SC).is_err(), "PRE_COPY needs the flag");
        assert_eq!(decode(9), Err(StateError::Unknown(9)));
    }

    #[test]
    fn sessions_open_on_the_uapi_arcs() {
        let opening: Vec<_> = ARCS_ALL.iter().filter(|(a, b)| arc_opens_stream(*a, *b)).collect();
        assert_eq!(
            opening,
            [&(Stop, Resuming), &(Stop, StopCopy), &(Running, PreCopy), &(RunningP2p, PreCopyP2p)]
        );
    }
}

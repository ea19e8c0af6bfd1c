//! The destination's compatibility check of an incoming configuration
//! section, before anything is loaded.

use std::fmt;

use thiserror::Error;

use super::format::ConfigSection;

/// One difference between the incoming configuration and the local one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    #[error("RAM size differs: source {source_size:#x}, destination {local:#x}")]
    RamSize { source_size: u64, local: u64 },
    #[error("vCPU count differs: source {source_count}, destination {local}")]
    VcpuCount { source_count: u32, local: u32 },
    #[error("RAM block {id:?} of the source is missing on the destination")]
    MissingRamBlock { id: String },
    #[error("RAM block {id:?} size differs: source {source_size:#x}, destination {local:#x}")]
    RamBlockSize { id: String, source_size: u64, local: u64 },
    #[error("RAM block {id:?} of the destination is not in the stream")]
    ExtraRamBlock { id: String },
    #[error("device {id:?} ({kind}) of the source is missing on the destination")]
    MissingDevice { id: String, kind: String },
    #[error("device {id:?} kind differs: source {source_kind:?}, destination {local:?}")]
    DeviceKind { id: String, source_kind: String, local: String },
    #[error("device {id:?} ({kind}) state version {version} is newer than the destination plugin's state_version {supported}")]
    SectionVersionTooNew { id: String, kind: String, version: u32, supported: u32 },
    #[error("device {id:?} ({kind}) of the destination is not in the stream")]
    ExtraDevice { id: String, kind: String },
}

/// The incoming stream does not fit this VM: every mismatch found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct CompatError {
    pub mismatches: Vec<Mismatch>,
}

impl fmt::Display for CompatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "incoming migration is incompatible with this VM ({} mismatches)", self.mismatches.len())?;
        for m in &self.mismatches {
            write!(f, "; {m}")?;
        }
        Ok(())
    }
}

/// Compare the `incoming` configuration section with the destination's own
/// (`local`, whose device `section_version`s are the local plugins'
/// `state_version()`). The device sets and RAM blocks must be the same, each
/// device of the same kind, and no incoming section version newer than the
/// local one. A different plugin version alone is only logged.
pub fn check_compatibility(local: &ConfigSection, incoming: &ConfigSection) -> Result<(), CompatError> {
    let mut m = Vec::new();
    if incoming.ram_size != local.ram_size {
        m.push(Mismatch::RamSize { source_size: incoming.ram_size, local: local.ram_size });
    }
    if incoming.vcpus != local.vcpus {
        m.push(Mismatch::VcpuCount { source_count: incoming.vcpus, local: local.vcpus });
    }
    for b in &incoming.ram_blocks {
        match local.ram_block(&b.id) {
            None => m.push(Mismatch::MissingRamBlock { id: b.id.clone() }),
            Some(l) if l.size != b.size => {
                m.push(Mismatch::RamBlockSize { id: b.id.clone(), source_size: b.size, local: l.size })
            }
            Some(_) => {}
        }
    }
    for l in &local.ram_blocks {
        if incoming.ram_block(&l.id).is_none() {
            m.push(Mismatch::ExtraRamBlock { id: l.id.clone() });
        }
    }
    for d in &incoming.devices {
        match local.device(&d.id) {
            None => m.push(Mismatch::MissingDevice { id: d.id.clone(), kind: d.kind.clone() }),
            Some(l) if l.kind != d.kind => m.push(Mismatch::DeviceKind {
                id: d.id.clone(),
                source_kind: d.kind.clone(),
                local: l.kind.clone(),
            }),
            Some(l) => {
                if d.section_version > l.section_version {
                    m.push(Mismatch::SectionVersionTooNew {
                        id: d.id.clone(),
                        kind: d.kind.clone(),
                        version: d.section_version,
                        supported: l.section_version,
                    });
                }
                if d.plugin_version != l.plugin_version {
                    log::info!(
                        "migration: device {:?} ({}) plugin version {} on the source, {} here",
                        d.id,
                        d.kind,
                        d.plugin_version,
                        l.plugin_version
                    );
                }
            }
        }
    }
    for l in &local.devices {
        if incoming.device(&l.id).is_none() {
            m.push(Mismatch::ExtraDevice { id: l.id.clone(), kind: l.kind.clone() });
        }
    }
    if m.is_empty() {
        Ok(())
    } else {
        Err(CompatError { mismatches: m })
    }
}

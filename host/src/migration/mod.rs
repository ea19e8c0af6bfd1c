//! Live migration: the stream format, its writer and reader, transports and
//! the destination's compatibility check.
//!
//! The format is specified in `docs/migration-stream.md`. The migration
//! engine (VM core, dirty logging, device handlers) drives these layers:
//!
//! * source: [`connect`] a [`MigrationUri`], wrap it in a [`StreamWriter`],
//!   [`write_config`](StreamWriter::write_config), then per pre-copy round
//!   [`write_ram_pages`](StreamWriter::write_ram_pages) of the dirty pages
//!   and [`write_device`](StreamWriter::write_device) of each
//!   `save_live_iterate` chunk; with the VM stopped, the last dirty pages,
//!   the `save_live_complete_precopy` states, [`write_vcpu`](StreamWriter::write_vcpu),
//!   then [`finish`](StreamWriter::finish);
//! * destination: [`listen`], accept, [`StreamReader::new`], the first
//!   section is the configuration: [`check_compatibility`] against the
//!   local one; then each [`Section`] in turn: RAM batches with
//!   [`read_ram_into`](StreamReader::read_ram_into) the block's memory,
//!   device sections to the device's `load_state(version, data)`.

pub mod bench;
pub mod commands;
mod compat;
pub mod debug_commands;
mod decode;
pub mod dest;
pub mod device_ops;
mod encode;
pub mod extents;
mod format;
pub mod machine;
pub mod postcopy;
pub mod progress;
pub mod source;
pub mod transport;

pub use compat::{check_compatibility, CompatError, Mismatch};
pub use decode::{Page, StreamReader, READ_BUFFER};
pub use encode::{RamStats, StreamWriter, WRITE_BUFFER};
pub use format::*;
pub use transport::{connect, listen, MigrationListener, MigrationStream, MigrationUri, TransportError};

#[cfg(test)]
mod tests;

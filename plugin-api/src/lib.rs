//! The stable plugin ABI of dmhost.
//!
//! A plugin library depends on this crate only. It implements [`Plugin`]
//! and [`DeviceModel`] (plain Rust traits with defaults) and exports them
//! with [`export_plugin!`]; the host loads the library with abi_stable,
//! which checks the layout of every type here before any call is made.
//!
//! # Versioning
//!
//! This crate's version is the ABI version. abi_stable refuses a plugin
//! built against another major version. Within a major version the ABI is
//! append-only: [`PluginModule`] is a prefix type and the [`Device`] and
//! [`HostServices`] traits are sabi traits, so fields and methods may only be
//! added after the current last ones (and the `last_prefix_field` marker
//! stays where it is at 1.0). Existing types never change layout; a change
//! that needs that is a new major version.
//!
//! Direction of compatibility (abi_stable's layout checker, measured): a
//! host loads plugins built against its own plugin API version **or a
//! newer minor**. A newer plugin's appended `PluginModule` fields are
//! invisible to an older host, and the `HostServices` methods an older host
//! lacks answer with their default body. A plugin built against an *older*
//! minor than the host's is refused at load ("too many fields"): the
//! checker requires the implementation to have at least the interface's
//! fields, so after a minor bump plugins are rebuilt.
//!
//! ## 1.1 (append-only)
//!
//! - [`PluginModule`]: `vfio_drivers` and `open_vfio_driver`, after `create`,
//!   each `missing_field(option)`: read through the `Option`-returning
//!   accessors.
//! - `HostServices::open_vfio_driver`, after `write_guest` (which stays the
//!   last prefix field), with a default body that refuses: a 1.1 plugin in
//!   a 1.0 host gets `Unsupported` through it (checked: vfio-pci in a 1.0
//!   host fails `create` cleanly with that error). Likewise
//!   `register_msi_irqfd` / `unregister_msi_irqfd` (MSI delivery for
//!   passthrough devices).
//! - New types in [`vfio`]: the [`VfioDriverDevice`] contract and its data.
//! - PCI INTx through the VM's router (the iohub plugin):
//!   `HostServices::set_intx` after the VFIO methods, `Device::intx_set` and
//!   `Device::intx_route` after `is_fenced`, and the [`IntxRoute`] type.

// abi_stable's derive and sabi_trait macros generate these patterns.
#![allow(non_local_definitions, non_camel_case_types)]

pub mod backend;
mod device;
mod error;
pub mod export;
mod logging;
mod module;
mod services;
mod types;
pub mod vfio;

pub use abi_stable;
pub use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RString, RVec};
pub use device::{Device, DeviceBox, DeviceModel, Device_TO};
pub use error::{ErrorKind, PluginError, PluginResult};
pub use export::{wrap, Plugin};
pub use module::{PluginModule, PluginModule_Ref};
pub use services::{Host, HostServices, HostServices_TO, IoSpace, LogSink, LogSinkBox, LogSink_TO};
pub use types::{
    DeviceKind, DsmReply, DsmRequest, GuestRegion, IntxRoute, LogLevel, MemoryRegion, PendingSize, PlugInfo,
    SaveChunk,
};
pub use vfio::{
    MigState, VfioDataStream, VfioDeviceInfo, VfioDriver, VfioDriverBox, VfioDriverDevice,
    VfioDriverDevice_TO, VfioDriverInfo, VfioError, VfioIrqInfo, VfioPrecopyInfo, VfioRegionInfo,
};

/// Parse a plugin's JSON config into `T`, mapping errors to `InvalidConfig`
/// with the kind name and serde's position-bearing message.
pub fn parse_config<T: serde::de::DeserializeOwned>(kind: &str, config: &str) -> Result<T, PluginError> {
    let text = if config.trim().is_empty() { "{}" } else { config };
    serde_json::from_str(text).map_err(|e| PluginError::config(format!("{kind} config: {e}")))
}

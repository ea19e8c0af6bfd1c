//! The root module every plugin library exports.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RVec},
    StableAbi,
};

use crate::{DeviceBox, DeviceKind, Host, LogLevel, LogSinkBox, PluginError, VfioDriverBox, VfioDriverInfo};

/// A plugin library's entry points.
///
/// This is an abi_stable prefix type: fields may only be appended after
/// `create` (the last prefix field, frozen at 1.0), and a host reading a
/// field the library lacks gets `None` from its accessor: every appended
/// field is marked `#[sabi(missing_field(option))]`. (abi_stable's load-time
/// check admits libraries with the same or more fields than the host's
/// interface; see the crate docs on the direction of compatibility.)
///
/// Appended in 1.1: `vfio_drivers`, `open_vfio_driver`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModule_Ref)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's name (e.g. "pc-dimm").
    pub name: RStr<'static>,
    /// The plugin's own version (semver).
    pub version: RStr<'static>,
    /// The device kinds this plugin provides.
    pub kinds: extern "C" fn() -> RVec<DeviceKind>,
    /// Route the plugin's `log` records to the host; called once after loading.
    pub init_logging: extern "C" fn(sink: LogSinkBox, max_level: LogLevel),
    /// Create a device of `kind` named `id` from `config` (JSON text).
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(
        kind: RStr<'_>,
        id: RStr<'_>,
        config: RStr<'_>,
        host: Host,
    ) -> RResult<DeviceBox, PluginError>,

    // ---- 1.1: appended after the last prefix field (optional) ----
    /// The vendor VFIO drivers this library provides (may be empty).
    #[sabi(missing_field(option))]
    pub vfio_drivers: extern "C" fn() -> RVec<VfioDriverInfo>,
    /// Open the vendor VFIO driver `name` with `config` (JSON text); `host`
    /// is the services object of the device that uses it (DMA, logging).
    #[sabi(missing_field(option))]
    pub open_vfio_driver:
        extern "C" fn(name: RStr<'_>, config: RStr<'_>, host: Host) -> RResult<VfioDriverBox, PluginError>,
}

impl RootModule for PluginModule_Ref {
    declare_root_module_statics! {PluginModule_Ref}
    const BASE_NAME: &'static str = "dmhost_plugin";
    const NAME: &'static str = "dmhost_plugin";
    // The version of this crate: abi_stable refuses other major versions.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

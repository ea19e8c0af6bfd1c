//! Finds plugin libraries, loads them through abi_stable and indexes their
//! device kinds. Libraries are never unloaded: a device may outlive any
//! handle we could drop, and abi_stable leaks them by design.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use abi_stable::library::{lib_header_from_path, LibraryError};
use dmhost_plugin_api::{
    DeviceBox, DeviceKind, Host, LogLevel, LogSink, LogSink_TO, PluginError, PluginModule_Ref, RStr,
    VfioDriverBox, VfioDriverInfo,
};

use crate::elf::{check_shared_object, ElfError};

/// Environment variable naming extra plugin directories (`:`-separated).
pub const PLUGIN_PATH_ENV: &str = "DMHOST_PLUGIN_PATH";

/// Why one library could not be loaded. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: unreadable: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}: not a shared library: {reason}", path.display())]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{}: not a dmhost plugin: {reason}", path.display())]
    NotAPlugin { path: PathBuf, reason: String },
    #[error("{}: ABI layout mismatch with this host: {summary}", path.display())]
    AbiMismatch { path: PathBuf, summary: String },
    #[error("{}: incompatible plugin API version: {reason}", path.display())]
    IncompatibleVersion { path: PathBuf, reason: String },
    #[error("{}: root module failed to initialise: {reason}", path.display())]
    InitFailed { path: PathBuf, reason: String },
    #[error("{}: device kind {kind:?} is already provided by {}", path.display(), other.display())]
    DuplicateKind { path: PathBuf, kind: String, other: PathBuf },
    #[error("{}: invalid metadata: {reason}", path.display())]
    BadMetadata { path: PathBuf, reason: String },
}

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("no loaded plugin provides device kind {0:?}")]
    UnknownKind(String),
    #[error("plugin {plugin} could not create {kind} {id:?}: {source}")]
    Plugin { plugin: String, kind: String, id: String, source: PluginError },
    #[error("no loaded plugin provides a VFIO driver matching {0:?} (a driver name or vendor:device)")]
    UnknownVfioDriver(String),
    #[error("plugin {plugin} could not open VFIO driver {driver:?}: {source}")]
    VfioDriver { plugin: String, driver: String, source: PluginError },
}

/// A loaded plugin library.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub kinds: Vec<DeviceKind>,
    /// Vendor VFIO drivers (plugin API 1.1; empty for older plugins).
    pub vfio_drivers: Vec<VfioDriverInfo>,
    pub module: PluginModule_Ref,
    /// Time to open, layout-check and initialise the library.
    pub load_time: Duration,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl LoadedPlugin {
    pub fn kind_names(&self) -> Vec<String> {
        self.kinds.iter().map(|k| k.name.to_string()).collect()
    }

    /// Create a device of `kind`; the plugin validates `config` (JSON).
    pub fn create(&self, kind: &str, id: &str, config: &str, host: Host) -> Result<DeviceBox, CreateError> {
        (self.module.create())(RStr::from(kind), RStr::from(id), RStr::from(config), host)
            .into_result()
            .map_err(|source| CreateError::Plugin {
                plugin: self.name.clone(),
                kind: kind.into(),
                id: id.into(),
                source,
            })
    }

    /// Open this plugin's VFIO driver `name` (exact name) for a device
    /// whose services are `host`.
    pub fn open_vfio_driver(
        &self,
        name: &str,
        config: &str,
        host: Host,
    ) -> Result<VfioDriverBox, CreateError> {
        let open =
            self.module.open_vfio_driver().ok_or_else(|| CreateError::UnknownVfioDriver(name.into()))?;
        open(RStr::from(name), RStr::from(config), host).into_result().map_err(|source| {
            CreateError::VfioDriver { plugin: self.name.clone(), driver: name.into(), source }
        })
    }
}

/// Load one library and read its metadata.
pub fn load_library(path: &Path) -> Result<LoadedPlugin, LoadError> {
    let start = Instant::now();
    // dlopen searches the library path for a bare file name; a file named
    // on the command line means this directory.
    let local;
    let path = if path.parent().is_some_and(|p| p.as_os_str().is_empty()) {
        local = Path::new(".").join(path);
        local.as_path()
    } else {
        path
    };
    let p = || path.to_path_buf();
    check_shared_object(path).map_err(|e| match e {
        ElfError::Unreadable(reason) => LoadError::Unreadable { path: p(), reason },
        other => LoadError::NotALibrary { path: p(), reason: other.to_string() },
    })?;
    let header = lib_header_from_path(path).map_err(|e| classify(path, e))?;
    let module = header.init_root_module::<PluginModule_Ref>().map_err(|e| classify(path, e))?;
    let name = module.name().to_string();
    let version = module.version().to_string();
    let kinds = (module.kinds())().into_vec();
    // Optional (1.1): a 1.0 plugin has no such field and provides none.
    let vfio_drivers = module.vfio_drivers().map(|f| f().into_vec()).unwrap_or_default();
    if name.is_empty() || (kinds.is_empty() && vfio_drivers.is_empty()) {
        return Err(LoadError::BadMetadata {
            path: p(),
            reason: "plugin has no name or provides neither device kinds nor VFIO drivers".into(),
        });
    }
    (module.init_logging())(
        LogSink_TO::from_value(HostLogSink, abi_stable::sabi_trait::TD_Opaque),
        max_level(),
    );
    Ok(LoadedPlugin { path: p(), name, version, kinds, vfio_drivers, module, load_time: start.elapsed() })
}

fn classify(path: &Path, e: LibraryError) -> LoadError {
    let path = path.to_path_buf();
    match e {
        LibraryError::OpenError { err, .. } => LoadError::NotALibrary { path, reason: err.to_string() },
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path,
            reason: "it exports no abi_stable root module (was it built with export_plugin!?)".into(),
        },
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            LoadError::IncompatibleVersion {
                path,
                reason: format!(
                    "built against plugin API {actual_version}, this host needs {expected_version}"
                ),
            }
        }
        LibraryError::ParseVersionError(e) => LoadError::IncompatibleVersion { path, reason: e.to_string() },
        LibraryError::AbiInstability(e) => {
            let report = e.to_string();
            log::debug!("{}: full abi_stable layout report:\n{report}", path.display());
            let summary = older_api(&report).unwrap_or_else(|| summarize(&report));
            LoadError::AbiMismatch { path, summary }
        }
        LibraryError::InvalidAbiHeader(h) => {
            LoadError::AbiMismatch { path, summary: format!("abi_stable header {h:?}") }
        }
        LibraryError::InvalidCAbi { .. } => {
            LoadError::AbiMismatch { path, summary: "C ABI self-test failed".into() }
        }
        other => LoadError::InitFailed { path, reason: other.to_string() },
    }
}

/// abi_stable accepts a plugin built against the same or a *newer* minor
/// plugin API than the host's (appended fields and methods are optional to
/// it), and refuses an older one with "too many fields": say that plainly.
fn older_api(report: &str) -> Option<String> {
    if !report.contains("too many fields") {
        return None;
    }
    let ours = <PluginModule_Ref as abi_stable::library::RootModule>::VERSION_STRINGS.version;
    let theirs = report
        .split("package:'dmhost-plugin-api' version:'")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .find(|v| *v != ours)?;
    Some(format!(
        "built against plugin API {theirs}, older than this host's {ours}: a plugin must be built against the host's plugin API version or a newer minor; rebuild it"
    ))
}

/// abi_stable's layout report runs to thousands of lines; keep each
/// "Error:" with its expected/found values and the type it is about, so the
/// error stays one line. (The whole report is logged at debug level.)
fn summarize(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut ty = "";
    let mut after_expected = false;
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if *line == "Layout of expected type:" {
            after_expected = true;
        } else if after_expected && line.starts_with("type:") {
            ty = &line[5..];
            after_expected = false;
        } else if let Some(what) = line.strip_prefix("Error:") {
            let value = |label: &str| {
                lines[i + 1..].iter().position(|l| *l == label).and_then(|j| lines.get(i + 2 + j)).copied()
            };
            found.push(format!(
                "{ty}: {what} (expected {}, found {})",
                value("Expected:").unwrap_or("?"),
                value("Found:").unwrap_or("?")
            ));
        }
    }
    if found.is_empty() {
        return lines.first().copied().unwrap_or("layout check failed").chars().take(300).collect();
    }
    found.dedup();
    found.join("; ")
}

fn max_level() -> LogLevel {
    match log::max_level() {
        log::LevelFilter::Off | log::LevelFilter::Error => LogLevel::Error,
        log::LevelFilter::Warn => LogLevel::Warn,
        log::LevelFilter::Info => LogLevel::Info,
        log::LevelFilter::Debug => LogLevel::Debug,
        log::LevelFilter::Trace => LogLevel::Trace,
    }
}

/// Plugins' `log` records land in the host's logger.
struct HostLogSink;

impl LogSink for HostLogSink {
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        log::logger().log(
            &log::Record::builder()
                .level(level.into())
                .target(target.as_str())
                .args(format_args!("{message}"))
                .build(),
        );
    }
}

/// The plugin directories to scan: beside the binary, then `extra`, then
/// `DMHOST_PLUGIN_PATH`.
pub fn plugin_dirs(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(dir);
    }
    dirs.extend(extra.iter().cloned());
    if let Some(path) = std::env::var_os(PLUGIN_PATH_ENV) {
        dirs.extend(std::env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs
}

/// Shared libraries in `dir`, sorted by name.
pub fn libraries_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "so") && p.is_file())
        .collect();
    libs.sort();
    Ok(libs)
}

/// Every loaded plugin, indexed by device kind.
#[derive(Default, Debug)]
pub struct PluginRegistry {
    plugins: Vec<LoadedPlugin>,
    by_kind: BTreeMap<String, usize>,
}

impl PluginRegistry {
    /// Load every library in `dirs`. Failures do not stop the scan; each is
    /// returned as one error naming its file.
    pub fn discover(dirs: &[PathBuf]) -> (Self, Vec<LoadError>) {
        let mut reg = Self::default();
        let mut errors = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for dir in dirs {
            let libs = match libraries_in(dir) {
                Ok(libs) => libs,
                Err(e) => {
                    log::debug!("plugin directory {}: {e}", dir.display());
                    continue;
                }
            };
            for lib in libs {
                // The same file reached through two directories loads once.
                let canonical = lib.canonicalize().unwrap_or_else(|_| lib.clone());
                if !seen.insert(canonical) {
                    continue;
                }
                if let Err(e) = reg.load(&lib) {
                    errors.push(e);
                }
            }
        }
        (reg, errors)
    }

    /// Load one library and add its kinds; a kind already provided is refused.
    pub fn load(&mut self, path: &Path) -> Result<&LoadedPlugin, LoadError> {
        let plugin = load_library(path)?;
        for kind in plugin.kind_names() {
            if let Some(&i) = self.by_kind.get(&kind) {
                return Err(LoadError::DuplicateKind {
                    path: path.to_path_buf(),
                    kind,
                    other: self.plugins[i].path.clone(),
                });
            }
        }
        for d in &plugin.vfio_drivers {
            if let Some((other, _)) = self.vfio_drivers().find(|(_, o)| o.name == d.name) {
                log::warn!(
                    "{}: VFIO driver {:?} is also provided by {}; the first loaded is used",
                    path.display(),
                    d.name.as_str(),
                    other.path.display()
                );
            }
        }
        let index = self.plugins.len();
        for kind in plugin.kind_names() {
            self.by_kind.insert(kind, index);
        }
        log::debug!("loaded plugin {} {} from {}", plugin.name, plugin.version, path.display());
        self.plugins.push(plugin);
        Ok(&self.plugins[index])
    }

    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    pub fn plugin_for(&self, kind: &str) -> Option<&LoadedPlugin> {
        self.by_kind.get(kind).map(|&i| &self.plugins[i])
    }

    /// Every vendor VFIO driver of the loaded plugins, in load order.
    pub fn vfio_drivers(&self) -> impl Iterator<Item = (&LoadedPlugin, &VfioDriverInfo)> {
        self.plugins.iter().flat_map(|p| p.vfio_drivers.iter().map(move |d| (p, d)))
    }

    /// Open the first vendor VFIO driver matching `matching` (a driver name
    /// or "vvvv:dddd" PCI IDs in hex) with `config`, for the device whose
    /// services are `host`. This is what `HostServices::open_vfio_driver`
    /// calls.
    pub fn open_vfio_driver(
        &self,
        matching: &str,
        config: &str,
        host: Host,
    ) -> Result<VfioDriverBox, CreateError> {
        let (plugin, info) = self
            .vfio_drivers()
            .find(|(_, d)| d.matches(matching))
            .ok_or_else(|| CreateError::UnknownVfioDriver(matching.into()))?;
        plugin.open_vfio_driver(info.name.as_str(), config, host)
    }

    /// Create a device of `kind` through the plugin that provides it.
    pub fn create(&self, kind: &str, id: &str, config: &str, host: Host) -> Result<DeviceBox, CreateError> {
        self.plugin_for(kind)
            .ok_or_else(|| CreateError::UnknownKind(kind.into()))?
            .create(kind, id, config, host)
    }
}

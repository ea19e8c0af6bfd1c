//! The control socket: JSON lines on a UNIX socket, QMP-shaped.
//!
//! On connect the server sends a greeting line `{"QMP": {...}}`. Each
//! request is one line `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//! each reply is one line, `{"return": VALUE}` or
//! `{"error": {"class": CLASS, "desc": TEXT}}` (with the request's `id`
//! echoed when given). Invalid input gets an error object, never a crash.
//!
//! Commands live in a [`CommandRegistry`] by name, so other modules
//! (migration: `migrate`, `query-migrate`, ...) add theirs with
//! [`CommandRegistry::register`]. [`register_vm_commands`] adds
//! `device_add`, `device_del`, `query-devices`, `query-status`, `quit` and
//! `qmp_capabilities`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde_json::{json, Map, Value};

use crate::{
    devices::{DeviceFactory, DeviceImpl},
    vm::{vcpu::VmExit, Vm, VmError},
};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}")]
    Bind { path: String, source: std::io::Error },
    #[error("control socket {path} exists and is not a socket")]
    NotASocket { path: String },
}

/// A command's failure, as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class: `GenericError`, `CommandNotFound`, `DeviceNotFound`.
    pub class: &'static str,
    pub desc: String,
}

impl CommandError {
    pub fn generic(desc: impl std::fmt::Display) -> Self {
        Self { class: "GenericError", desc: desc.to_string() }
    }
    pub fn to_json(&self) -> Value {
        json!({"error": {"class": self.class, "desc": self.desc}})
    }
}

/// Arguments of a command (the `arguments` object).
pub type Args = Map<String, Value>;
/// A command handler.
pub type Handler = Box<dyn Fn(&Args) -> Result<Value, CommandError> + Send + Sync>;

/// Commands by name.
#[derive(Default)]
pub struct CommandRegistry {
    handlers: RwLock<BTreeMap<String, Arc<Handler>>>,
}

impl CommandRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) command `name`.
    pub fn register(
        &self,
        name: &str,
        handler: impl Fn(&Args) -> Result<Value, CommandError> + Send + Sync + 'static,
    ) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::new(Box::new(handler)));
    }

    pub fn names(&self) -> Vec<String> {
        self.handlers.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Run one request line; returns the reply object.
    pub fn dispatch_line(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return CommandError::generic(format!("invalid JSON: {e}")).to_json(),
        };
        let id = req.get("id").cloned();
        let mut reply = self.dispatch(&req);
        if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
            obj.insert("id".into(), id);
        }
        reply
    }

    /// Run one parsed request.
    pub fn dispatch(&self, req: &Value) -> Value {
        let Some(obj) = req.as_object() else {
            return CommandError::generic("a request must be a JSON object").to_json();
        };
        let Some(name) = obj.get("execute").and_then(Value::as_str) else {
            return CommandError::generic("missing \"execute\" (a string)").to_json();
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return CommandError::generic("\"arguments\" must be an object").to_json(),
        };
        let handler = self.handlers.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        let Some(handler) = handler else {
            return CommandError {
                class: "CommandNotFound",
                desc: format!("the command {name} has not been found"),
            }
            .to_json();
        };
        // A handler bug must not take the VM down.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(args))) {
            Ok(Ok(v)) => json!({ "return": v }),
            Ok(Err(e)) => e.to_json(),
            Err(_) => CommandError::generic(format!("command {name} failed internally")).to_json(),
        }
    }
}

fn str_arg<'a>(args: &'a Args, name: &str) -> Result<&'a str, CommandError> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(CommandError::generic(format!("parameter '{name}' must be a string"))),
        None => Err(CommandError::generic(format!("parameter '{name}' is missing"))),
    }
}

fn vm_error(e: VmError) -> CommandError {
    match e {
        VmError::NoSuchDevice(_) => CommandError { class: "DeviceNotFound", desc: e.to_string() },
        other => CommandError::generic(other),
    }
}

/// Register the VM commands on `registry`.
pub fn register_vm_commands(registry: &CommandRegistry, vm: Arc<Vm>, factory: Arc<dyn DeviceFactory>) {
    registry.register("qmp_capabilities", |_| Ok(json!({})));
    let v = Arc::clone(&vm);
    registry.register("device_add", move |args| {
        let kind = match (args.get("driver"), args.get("kind")) {
            (Some(_), Some(_)) => return Err(CommandError::generic("give 'driver' or 'kind', not both")),
            (Some(_), None) => str_arg(args, "driver")?,
            (None, Some(_)) => str_arg(args, "kind")?,
            (None, None) => return Err(CommandError::generic("parameter 'driver' is missing")),
        }
        .to_owned();
        let id = str_arg(args, "id")?.to_owned();
        let isolation = match args.get("isolation") {
            None => crate::config::Isolation::None,
            Some(_) => {
                crate::config::Isolation::parse(str_arg(args, "isolation")?).map_err(CommandError::generic)?
            }
        };
        let config: Map<String, Value> = args
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "driver" | "kind" | "id" | "isolation"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let config = Value::Object(config).to_string();
        let f = Arc::clone(&factory);
        let info = crate::remote::add_device(&v, &*f, &kind, &id, &config, isolation).map_err(vm_error)?;
        serde_json::to_value(info).map_err(CommandError::generic)
    });
    let v = Arc::clone(&vm);
    registry.register("device_del", move |args| {
        let id = str_arg(args, "id")?;
        v.remove_device(id).map_err(vm_error)?;
        Ok(json!({}))
    });
    let v = Arc::clone(&vm);
    registry
        .register("query-devices", move |_| serde_json::to_value(v.devices()).map_err(CommandError::generic));
    let v = Arc::clone(&vm);
    registry.register("query-status", move |_| {
        let status = match v.control().exit() {
            Some(_) => "shutdown",
            None if v.paused() => "paused",
            None => "running",
        };
        Ok(json!({"status": status, "running": status == "running"}))
    });
    let v = vm;
    registry.register("quit", move |_| {
        v.stop(VmExit::Requested);
        Ok(json!({}))
    });
}

/// A listening control socket; stops and removes the socket when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listen on `path` (a stale socket file there is replaced).
    pub fn start(path: &Path, registry: Arc<CommandRegistry>) -> Result<Self, ControlError> {
        let name = path.display().to_string();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket { path: name });
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|source| ControlError::Bind { path: name.clone(), source })?;
        listener.set_nonblocking(true).map_err(|source| ControlError::Bind { path: name, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, registry, st))
            .ok();
        Ok(Self { path: path.to_path_buf(), stop, thread })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, registry: Arc<CommandRegistry>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let r = Arc::clone(&registry);
                let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                    if let Err(e) = serve(stream, &r) {
                        log::debug!("control connection ended: {e}");
                    }
                });
                if let Err(e) = spawned {
                    log::warn!("control: cannot serve a connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                log::warn!("control: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(stream: UnixStream, registry: &CommandRegistry) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut out = stream.try_clone()?;
    let greeting = json!({"QMP": {"version": {"package": concat!("dmhost ", env!("CARGO_PKG_VERSION"))}, "capabilities": []}});
    writeln!(out, "{greeting}")?;
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') && n > MAX_LINE {
            let e = CommandError::generic(format!("request longer than {MAX_LINE} bytes"));
            writeln!(out, "{}", e.to_json())?;
            return Ok(());
        }
        let reply = match std::str::from_utf8(&buf) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => registry.dispatch_line(line.trim()),
            Err(_) => CommandError::generic("request is not UTF-8").to_json(),
        };
        writeln!(out, "{reply}")?;
    }
}

/// Used by `device_add`: kinds come from the plugin registry.
impl DeviceFactory for crate::loader::PluginRegistry {
    fn create(
        &self,
        kind: &str,
        id: &str,
        config: &str,
        host: dmhost_plugin_api::Host,
    ) -> Result<DeviceImpl, dmhost_plugin_api::PluginError> {
        use crate::loader::CreateError;
        crate::loader::PluginRegistry::create(self, kind, id, config, host).map(DeviceImpl::Plugin).map_err(
            |e| match e {
                CreateError::UnknownKind(_) | CreateError::UnknownVfioDriver(_) => {
                    dmhost_plugin_api::PluginError::unsupported(e)
                }
                CreateError::Plugin { source, .. } | CreateError::VfioDriver { source, .. } => source,
            },
        )
    }
    fn library_path(&self, kind: &str) -> Option<std::path::PathBuf> {
        self.plugin_for(kind).map(|p| p.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_errors_are_objects() {
        let r = CommandRegistry::new();
        r.register("echo", |a| Ok(Value::Object(a.clone())));
        r.register("boom", |_| panic!("handler bug"));
        assert_eq!(
            r.dispatch_line(r#"{"execute":"echo","arguments":{"a":1},"id":7}"#),
            json!({"return":{"a":1},"id":7})
        );
        for (bad, class) in [
            ("nonsense", "GenericError"),
            ("[]", "GenericError"),
            (r#"{"execute":5}"#, "GenericError"),
            (r#"{"execute":"echo","arguments":[1]}"#, "GenericError"),
            (r#"{"execute":"nope"}"#, "CommandNotFound"),
            (r#"{"execute":"boom"}"#, "GenericError"),
        ] {
            let v = r.dispatch_line(bad);
            assert_eq!(v["error"]["class"], class, "{bad}: {v}");
            assert!(v["error"]["desc"].is_string());
        }
    }
}

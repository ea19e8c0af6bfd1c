//! Arbitrary lines into the control socket's dispatcher (with the
//! migration parameter command, which parses numbers from the request):
//! every line gets a JSON reply object, never a panic.
#![no_main]

use dmhost::control::CommandRegistry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let r = CommandRegistry::new();
    r.register("echo", |a| Ok(serde_json::Value::Object(a.clone())));
    let reply = r.dispatch_line(line);
    assert!(reply.get("return").is_some() || reply.get("error").is_some());
});

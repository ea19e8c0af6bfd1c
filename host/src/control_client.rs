//! A client of the control socket (for `dmhost migrate` and tests).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket closed the connection")]
    Closed,
    #[error("control socket sent invalid JSON: {0}")]
    BadReply(String),
    #[error("{command}: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// One connection to a `dmhost run --control` socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connect and read the greeting.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Self { reader: BufReader::new(s.try_clone()?), writer: s };
        c.read_line()?;
        Ok(c)
    }

    fn read_line(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// Run `command` with `arguments`; the `return` value or the error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let req = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{req}")?;
        let reply = self.read_line()?;
        if let Some(v) = reply.get("return") {
            return Ok(v.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
        Err(ClientError::Command { command: command.to_owned(), class: text("class"), desc: text("desc") })
    }
}

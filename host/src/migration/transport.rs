//! Migration transports: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH`.
//!
//! The source [`connect`]s; the destination [`listen`]s and accepts one
//! connection. Both get a [`MigrationStream`] (Read + Write).
//!
//! Return path (post-copy, later): sockets are bidirectional, so the
//! destination's page requests will travel back on a
//! [`MigrationStream::try_clone`] of the same connection, read by a thread
//! of the source while the main stream is written. A `file:` stream has no
//! return path (`try_clone` refuses it).

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// Socket buffer size asked for each direction (the kernel caps it at
/// `net.core.{w,r}mem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Buffer of a `file:` stream.
const FILE_BUFFER: usize = 1 << 20;

/// Errors of the migration transports.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("migration URI {0:?} has no scheme: expected tcp:HOST:PORT, unix:PATH or file:PATH")]
    NoScheme(String),
    #[error("unknown migration URI scheme {0:?}: expected tcp, unix or file")]
    UnknownScheme(String),
    #[error("migration URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: &'static str },
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] io::Error),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    #[error("cannot accept a connection on {0}")]
    Accept(String, #[source] io::Error),
    #[error("cannot open migration file {0}")]
    File(PathBuf, #[source] io::Error),
    #[error("cannot set socket option {0}")]
    SocketOption(&'static str, #[source] io::Error),
    #[error("a file stream has no return path")]
    NoReturnPath,
}

/// Where a migration goes to or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; an IPv6 host in brackets (`tcp:[::1]:4444`).
    Tcp { host: String, port: u16 },
    /// `unix:PATH`: a UNIX stream socket.
    Unix(PathBuf),
    /// `file:PATH`: the source writes the stream to a file, the destination reads it.
    File(PathBuf),
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, TransportError> {
        let (scheme, rest) = uri
            .split_once(':')
            .filter(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic()))
            .ok_or_else(|| TransportError::NoScheme(uri.into()))?;
        let bad = |reason| TransportError::BadUri { uri: uri.into(), reason };
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                let host = match host.strip_prefix('[') {
                    Some(h) => h.strip_suffix(']').ok_or_else(|| bad("unclosed '[' in the host"))?,
                    None if host.contains(':') => return Err(bad("an IPv6 host must be in brackets")),
                    None => host,
                };
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                let port = port.parse().map_err(|_| bad("port is not a number in 0..=65535"))?;
                Ok(Self::Tcp { host: host.into(), port })
            }
            "unix" | "file" if rest.is_empty() => Err(bad("empty path")),
            "unix" => Ok(Self::Unix(rest.into())),
            "file" => Ok(Self::File(rest.into())),
            _ => Err(TransportError::UnknownScheme(scheme.into())),
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A connected migration transport.
#[derive(Debug)]
pub enum MigrationStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Source side of `file:`.
    FileWrite(BufWriter<File>),
    /// Destination side of `file:`.
    FileRead(BufReader<File>),
}

impl MigrationStream {
    /// Shut the connection down in both directions (every handle on it
    /// sees EOF or an error); a no-op for files.
    pub fn shutdown(&self) {
        match self {
            Self::Tcp(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Self::Unix(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            _ => {}
        }
    }

    /// Send small writes at once (return path, urgent pages): Nagle's
    /// algorithm with delayed ACKs would hold them for tens of ms.
    pub fn set_nodelay(&self) {
        if let Self::Tcp(s) = self {
            if let Err(e) = s.set_nodelay(true) {
                log::warn!("migration: TCP_NODELAY: {e}");
            }
        }
    }

    /// Bound blocking reads (None = wait forever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) {
        match self {
            Self::Tcp(s) => drop(s.set_read_timeout(t)),
            Self::Unix(s) => drop(s.set_read_timeout(t)),
            _ => {}
        }
    }

    /// A second handle on the same connection, for a return path.
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        match self {
            Self::Tcp(s) => s.try_clone().map(Self::Tcp).map_err(|e| TransportError::SocketOption("dup", e)),
            Self::Unix(s) => {
                s.try_clone().map(Self::Unix).map_err(|e| TransportError::SocketOption("dup", e))
            }
            Self::FileWrite(_) | Self::FileRead(_) => Err(TransportError::NoReturnPath),
        }
    }
}

fn wrong_direction() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "migration file stream opened for the other direction")
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::FileRead(f) => f.read(buf),
            Self::FileWrite(_) => Err(wrong_direction()),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read_vectored(bufs),
            Self::Unix(s) => s.read_vectored(bufs),
            Self::FileRead(f) => f.read_vectored(bufs),
            Self::FileWrite(_) => Err(wrong_direction()),
        }
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::FileWrite(f) => f.write(buf),
            Self::FileRead(_) => Err(wrong_direction()),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::FileWrite(f) => f.write_vectored(bufs),
            Self::FileRead(_) => Err(wrong_direction()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
            Self::FileWrite(f) => f.flush(),
            Self::FileRead(_) => Ok(()),
        }
    }
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, TransportError> {
    let what = || format!("{host}:{port}");
    let addrs: Vec<_> =
        (host, port).to_socket_addrs().map_err(|e| TransportError::Resolve(what(), e))?.collect();
    if addrs.is_empty() {
        return Err(TransportError::Resolve(what(), io::ErrorKind::NotFound.into()));
    }
    Ok(addrs)
}

/// Source side: connect to `uri` (create or truncate the file of `file:`).
pub fn connect(uri: &MigrationUri) -> Result<MigrationStream, TransportError> {
    let stream = match uri {
        MigrationUri::Tcp { host, port } => {
            let mut last = None;
            let mut stream = None;
            for addr in resolve(host, *port)? {
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = stream.ok_or_else(|| {
                TransportError::Connect(
                    uri.to_string(),
                    last.unwrap_or_else(|| io::ErrorKind::NotFound.into()),
                )
            })?;
            tune_tcp(&s)?;
            MigrationStream::Tcp(s)
        }
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| TransportError::Connect(uri.to_string(), e))?;
            set_buffers(&s)?;
            MigrationStream::Unix(s)
        }
        MigrationUri::File(path) => {
            let f = File::create(path).map_err(|e| TransportError::File(path.clone(), e))?;
            MigrationStream::FileWrite(BufWriter::with_capacity(FILE_BUFFER, f))
        }
    };
    log::info!("migration: connected to {uri}");
    Ok(stream)
}

/// Destination side, bound and waiting for the one incoming migration.
#[derive(Debug)]
pub enum MigrationListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    File(PathBuf),
}

/// Destination side: bind `uri` (a `tcp:` port 0 picks a free port, see
/// [`MigrationListener::uri`]). A stale UNIX socket file at the path is
/// replaced; any other file there is an error.
pub fn listen(uri: &MigrationUri) -> Result<MigrationListener, TransportError> {
    let l = match uri {
        MigrationUri::Tcp { host, port } => {
            let addrs = resolve(host, *port)?;
            let l = TcpListener::bind(&addrs[..]).map_err(|e| TransportError::Listen(uri.to_string(), e))?;
            MigrationListener::Tcp(l)
        }
        MigrationUri::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                log::info!("migration: replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| TransportError::Listen(uri.to_string(), e))?;
            }
            let l = UnixListener::bind(path).map_err(|e| TransportError::Listen(uri.to_string(), e))?;
            MigrationListener::Unix(l, path.clone())
        }
        MigrationUri::File(path) => MigrationListener::File(path.clone()),
    };
    log::info!("migration: listening on {}", l.uri());
    Ok(l)
}

impl MigrationListener {
    /// The URI a source connects to (with the actual port of `tcp:…:0`).
    pub fn uri(&self) -> MigrationUri {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => MigrationUri::Tcp { host: a.ip().to_string(), port: a.port() },
                Err(_) => MigrationUri::Tcp { host: "?".into(), port: 0 },
            },
            Self::Unix(_, p) => MigrationUri::Unix(p.clone()),
            Self::File(p) => MigrationUri::File(p.clone()),
        }
    }

    /// Accept a connection and keep listening (post-copy accepts a second,
    /// urgent-page connection on the same address); [`close`](Self::close)
    /// when done.
    pub fn accept_next(&self) -> Result<MigrationStream, TransportError> {
        let uri = self.uri();
        Ok(match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().map_err(|e| TransportError::Accept(uri.to_string(), e))?;
                log::info!("migration: accepted {peer} on {uri}");
                tune_tcp(&s)?;
                MigrationStream::Tcp(s)
            }
            Self::Unix(l, _) => {
                let (s, _) = l.accept().map_err(|e| TransportError::Accept(uri.to_string(), e))?;
                log::info!("migration: accepted a connection on {uri}");
                set_buffers(&s)?;
                MigrationStream::Unix(s)
            }
            Self::File(path) => {
                let f = File::open(path).map_err(|e| TransportError::File(path.clone(), e))?;
                MigrationStream::FileRead(BufReader::with_capacity(FILE_BUFFER, f))
            }
        })
    }

    /// Stop listening (a UNIX socket's path is removed).
    pub fn close(self) {
        if let Self::Unix(_, path) = &self {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("migration: cannot remove socket {}: {e}", path.display());
            }
        }
    }

    /// Accept the one incoming migration (open the file of `file:`). The
    /// listening socket is closed, and a UNIX socket's path removed.
    pub fn accept(self) -> Result<MigrationStream, TransportError> {
        let uri = self.uri();
        let s = match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().map_err(|e| TransportError::Accept(uri.to_string(), e))?;
                log::info!("migration: accepted {peer} on {uri}");
                tune_tcp(&s)?;
                MigrationStream::Tcp(s)
            }
            Self::Unix(l, path) => {
                let r = l.accept();
                if let Err(e) = std::fs::remove_file(&path) {
                    log::warn!("migration: cannot remove socket {}: {e}", path.display());
                }
                let (s, _) = r.map_err(|e| TransportError::Accept(uri.to_string(), e))?;
                log::info!("migration: accepted a connection on {uri}");
                set_buffers(&s)?;
                MigrationStream::Unix(s)
            }
            Self::File(path) => {
                let f = File::open(&path).map_err(|e| TransportError::File(path.clone(), e))?;
                MigrationStream::FileRead(BufReader::with_capacity(FILE_BUFFER, f))
            }
        };
        Ok(s)
    }
}

/// Nagle stays on (the stream is bulk data written in large blocks), and
/// large socket buffers. Setting SO_{SND,RCV}BUF turns Linux's TCP buffer
/// auto-tuning off, which grows them further when its limit
/// (`net.ipv4.tcp_{w,r}mem`, 4 MiB / 32 MiB by default) allows; so they are
/// only set where that limit is below [`SOCKET_BUFFER`]. Measured on
/// loopback, auto-tuned buffers were as fast or faster than fixed 4 MiB ones.
fn tune_tcp(s: &TcpStream) -> Result<(), TransportError> {
    s.set_nodelay(false).map_err(|e| TransportError::SocketOption("TCP_NODELAY", e))?;
    if autotune_max("/proc/sys/net/ipv4/tcp_wmem").min(autotune_max("/proc/sys/net/ipv4/tcp_rmem"))
        >= SOCKET_BUFFER
    {
        return Ok(());
    }
    set_buffers(s)
}

/// The third (max) field of a `tcp_{w,r}mem` sysctl, or 0.
fn autotune_max(path: &str) -> usize {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn set_buffers(s: &impl AsRawFd) -> Result<(), TransportError> {
    for (opt, name) in [(libc::SO_SNDBUF, "SO_SNDBUF"), (libc::SO_RCVBUF, "SO_RCVBUF")] {
        let want = SOCKET_BUFFER as libc::c_int;
        if get_sockopt(s, opt).is_ok_and(|have| have >= want) {
            continue;
        }
        set_sockopt(s, opt, want).map_err(|e| TransportError::SocketOption(name, e))?;
        if let Ok(got) = get_sockopt(s, opt) {
            log::debug!("migration: {name} {got} bytes (asked {want})");
        }
    }
    Ok(())
}

fn set_sockopt(s: &impl AsRawFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is an open socket owned by `s`; the option value is a
    // c_int that lives across the call and whose size is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_sockopt(s: &impl AsRawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is an open socket owned by `s`; value and len are
    // valid for writes and len holds the size of value.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

//! The error a plugin returns across the ABI.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// What kind of failure a [`PluginError`] reports.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device configuration (JSON) is malformed or out of range.
    InvalidConfig,
    /// The request does not apply to this device (wrong kind, method unsupported).
    Unsupported,
    /// The device is not in a state that allows the request (e.g. double plug).
    InvalidState,
    /// The host refused a request (e.g. a physmap change of a range the device does not own).
    Denied,
    /// An I/O or system error.
    Io,
    /// Migration data was malformed or of an unsupported version.
    Migration,
    /// The device panicked; it is fenced and refuses every further call.
    Panicked,
    /// The device was fenced after an earlier panic.
    Fenced,
    /// Anything else.
    Other,
}

/// An error crossing the plugin boundary: a kind and a sentence.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self { kind, message: RString::from(message.to_string()) }
    }
    pub fn config(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidConfig, message)
    }
    pub fn state(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidState, message)
    }
    pub fn migration(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Migration, message)
    }
    pub fn io(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn denied(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Denied, message)
    }
    pub fn unsupported(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<std::io::Error> for PluginError {
    fn from(e: std::io::Error) -> Self {
        Self::io(e)
    }
}

/// Result type used across the ABI.
pub type PluginResult<T> = abi_stable::std_types::RResult<T, PluginError>;

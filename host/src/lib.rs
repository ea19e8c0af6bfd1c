//! dmhost: a plugin-based VM device-model host.

pub mod devices;
pub mod guest;
pub mod services;
pub mod vm;

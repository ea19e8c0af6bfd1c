//! dmhost: a plugin-based VM device-model host.

pub mod migration;

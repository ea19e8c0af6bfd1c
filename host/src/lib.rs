//! dmhost: a plugin-based VM device-model host.
//!
//! The host owns the VM, guest memory, the address space, ACPI assembly and
//! migration; every device is a plugin library loaded through
//! [`dmhost_plugin_api`].

pub mod acpi_host;
pub mod cli;
pub mod config;
pub mod control;
pub mod control_client;
pub mod devices;
pub mod elf;
pub mod guest;
pub mod intx;
pub mod loader;
pub mod migration;
pub mod pci;
pub mod remote;
pub mod run;
pub mod services;
pub mod testing;
pub mod uffd;
pub mod vm;

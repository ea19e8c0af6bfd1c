//! The register bank: 64-bit registers at `mmio-base + offset`. Accesses of
//! 1, 2, 4 or 8 bytes at any offset inside a register are allowed.

/// Size of the MMIO bank.
pub const BANK_SIZE: u64 = 0x1000;

/// Read-only magic: `0x7e57_de00_0000_0001`.
pub const ID: u64 = 0x00;
/// Read/write scratch register.
pub const SCRATCH: u64 = 0x08;
/// Reads return the last value written here, bitwise inverted (so a reply
/// provably came from the device and not from memory).
pub const ECHO: u64 = 0x10;
/// Number of MMIO writes the device has seen (any register). Writing it
/// resets it to the written value.
pub const COUNTER: u64 = 0x18;
/// Guest-physical address for a physmap request.
pub const PM_GPA: u64 = 0x20;
/// Size in bytes for a physmap request.
pub const PM_SIZE: u64 = 0x28;
/// Offset in the device's RAM region for `PM_CMD_ADD`.
pub const PM_OFFSET: u64 = 0x30;
/// Write [`PM_CMD_REMOVE`] or [`PM_CMD_ADD`] to issue the request.
pub const PM_CMD: u64 = 0x38;
/// Result of the last request: [`STATUS_OK`] or `1 + ErrorKind as u8`
/// (so [`STATUS_DENIED`] for a refusal).
pub const PM_STATUS: u64 = 0x40;
/// Guest-physical base of the device's RAM region (0 when none).
pub const REGION_GPA: u64 = 0x48;
/// Size of the device's RAM region (0 when none).
pub const REGION_SIZE: u64 = 0x50;

/// INTx: write 1 to raise the device's pin, 0 to lower it (through the
/// host's INTx router, `set_intx(devfn, intx-pin, level)`); reads the level.
pub const IRQ: u64 = 0x58;
/// Result of the last `IRQ` write: [`STATUS_OK`] or `1 + ErrorKind as u8`.
pub const IRQ_STATUS: u64 = 0x60;

pub const ID_VALUE: u64 = 0x7e57_de00_0000_0001;
pub const PM_CMD_REMOVE: u64 = 1;
pub const PM_CMD_ADD: u64 = 2;
pub const STATUS_OK: u64 = 0;
/// `1 + ErrorKind::Denied as u8`.
pub const STATUS_DENIED: u64 = 1 + dmhost_plugin_api::ErrorKind::Denied as u64;
/// No request was made yet.
pub const STATUS_NONE: u64 = u64::MAX;

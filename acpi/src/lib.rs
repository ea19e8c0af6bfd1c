//! ACPI table assembly (RSDP/XSDT/FADT/MADT/DSDT/SSDT/NFIT) for dmhost.

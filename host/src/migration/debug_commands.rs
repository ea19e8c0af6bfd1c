//! `x-query-ram-digest`: a checksum of part of a RAM block, so tests and
//! operators can compare memory on both sides of a migration (e.g. an
//! NVDIMM label area, which the guest does not map and so cannot check).

use std::sync::Arc;

use serde_json::{json, Value};

use crate::{
    control::{CommandError, CommandRegistry},
    vm::Vm,
};

use super::machine::block_bytes;

pub fn register(registry: &CommandRegistry, vm: Arc<Vm>) {
    registry.register("x-query-ram-digest", move |args| {
        let block = args
            .get("block")
            .and_then(Value::as_str)
            .ok_or_else(|| CommandError::generic("parameter 'block' (a string) is missing"))?;
        let b = vm
            .ram_blocks()
            .into_iter()
            .find(|b| b.name == block)
            .ok_or_else(|| CommandError::generic(format!("no RAM block {block:?}")))?;
        let num = |k: &str, default: u64| match args.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| CommandError::generic(format!("'{k}' must be a non-negative integer"))),
        };
        let offset = num("offset", 0)?;
        let length = num("length", b.size.saturating_sub(offset))?;
        let end = offset.checked_add(length).filter(|&e| e <= b.size).ok_or_else(|| {
            CommandError::generic(format!(
                "range {offset}+{length} is outside block {block:?} ({} bytes)",
                b.size
            ))
        })?;
        // SAFETY: the block is registered (we just listed it) and stays so
        // while the command runs on the control thread; a concurrently
        // running guest makes the digest a snapshot, which is what it is.
        let mem = unsafe { block_bytes(&b) };
        let crc = crc32c::crc32c(&mem[offset as usize..end as usize]);
        Ok(json!({"block": block, "offset": offset, "length": length, "crc32c": crc}))
    });
}

//! The migration commands of the control socket (QMP names): `migrate`,
//! `query-migrate`, `migrate_cancel`, `migrate-set-parameters`.

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value};

use crate::{
    control::{Args, CommandError, CommandRegistry},
    vm::Vm,
};

use super::{progress::Progress, source::migrate, MigrationUri};

/// Register the migration commands for `vm`; returns the shared progress.
pub fn register(registry: &CommandRegistry, vm: Arc<Vm>) -> Arc<Progress> {
    let progress = Arc::new(Progress::default());
    let (v, p) = (Arc::clone(&vm), Arc::clone(&progress));
    registry.register("migrate", move |args| {
        let uri: MigrationUri = match args.get("uri") {
            Some(Value::String(s)) => s.parse().map_err(CommandError::generic)?,
            _ => return Err(CommandError::generic("parameter 'uri' (a string) is missing")),
        };
        if v.control().exit().is_some() {
            return Err(CommandError::generic("the VM has stopped"));
        }
        p.begin().map_err(CommandError::generic)?;
        let (v, p) = (Arc::clone(&v), Arc::clone(&p));
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || match migrate(&v, &uri, &p) {
                Ok(_) => p.set_status(super::progress::Status::Completed),
                Err(e) => {
                    log::error!("migration to {uri} failed: {e}");
                    let cancelled = matches!(e, super::source::MigrationError::Cancelled);
                    p.fail(e.to_string(), cancelled);
                }
            })
            .map_err(CommandError::generic)?;
        Ok(json!({}))
    });
    let p = Arc::clone(&progress);
    registry.register("query-migrate", move |_| Ok(p.to_json()));
    let p = Arc::clone(&progress);
    registry.register("migrate_cancel", move |_| {
        p.request_cancel();
        Ok(json!({}))
    });
    let p = Arc::clone(&progress);
    registry.register("migrate-set-parameters", move |args| {
        p.set_params(parse_params(p.params(), args)?);
        Ok(json!({}))
    });
    progress
}

fn parse_params(mut params: super::progress::Parameters, args: &Args) -> Result<super::progress::Parameters, CommandError> {
    for (k, v) in args {
        let n = v
            .as_u64()
            .ok_or_else(|| CommandError::generic(format!("parameter '{k}' must be a non-negative integer")))?;
        match k.as_str() {
            // QEMU's downtime-limit is in milliseconds.
            "downtime-limit" | "max-downtime" => params.max_downtime = Duration::from_millis(n),
            "max-bandwidth" => params.max_bandwidth = n,
            "max-rounds" | "x-max-rounds" => {
                params.max_rounds = u32::try_from(n).ok().filter(|&r| r > 0).ok_or_else(|| {
                    CommandError::generic("max-rounds must be between 1 and 2^32-1")
                })?
            }
            other => return Err(CommandError::generic(format!("unknown migration parameter '{other}'"))),
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_and_reject() {
        let base = super::super::progress::Parameters::default();
        let args: Args = serde_json::from_str(r#"{"downtime-limit": 20, "max-bandwidth": 1000}"#).unwrap();
        let p = parse_params(base, &args).unwrap();
        assert_eq!(p.max_downtime, Duration::from_millis(20));
        assert_eq!(p.max_bandwidth, 1000);
        for bad in [r#"{"max-rounds": 0}"#, r#"{"bogus": 1}"#, r#"{"max-bandwidth": -1}"#, r#"{"max-bandwidth": "x"}"#] {
            let args: Args = serde_json::from_str(bad).unwrap();
            assert!(parse_params(base, &args).is_err(), "{bad}");
        }
    }
}

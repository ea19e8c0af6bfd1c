//! The migration commands of the control socket (QMP names): `migrate`
//! (with `resume` for a paused post-copy), `query-migrate`,
//! `migrate_cancel`, `migrate-set-parameters`, `migrate-start-postcopy`,
//! `migrate-recover` (destination), and the hidden `x-postcopy-break`
//! (shuts the post-copy connections down, for tests).

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value};

use crate::{
    control::{Args, CommandError, CommandRegistry},
    vm::Vm,
};

use super::{
    progress::{Progress, Resume, Status},
    source::migrate,
    MigrationUri,
};

/// Register the migration commands for `vm`; returns the shared progress.
pub fn register(registry: &CommandRegistry, vm: Arc<Vm>) -> Arc<Progress> {
    let progress = Arc::new(Progress::default());
    let (v, p) = (Arc::clone(&vm), Arc::clone(&progress));
    registry.register("migrate", move |args| {
        let uri: MigrationUri = match args.get("uri") {
            Some(Value::String(s)) => s.parse().map_err(CommandError::generic)?,
            _ => return Err(CommandError::generic("parameter 'uri' (a string) is missing")),
        };
        if args.get("resume").and_then(Value::as_bool) == Some(true) {
            p.resume(Resume::Connect(uri)).map_err(CommandError::generic)?;
            return Ok(json!({}));
        }
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
    let (v, p) = (Arc::clone(&vm), Arc::clone(&progress));
    registry.register("migrate-start-postcopy", move |_| {
        match p.status() {
            Status::Setup | Status::Active => {}
            s => {
                return Err(CommandError::generic(
                    format!("post-copy can start only during pre-copy (status {s:?})").to_lowercase(),
                ))
            }
        }
        let devs = super::machine::devices(&v);
        let params = p.params();
        if let Some(why) = super::source::postcopy_blocker(&devs, p.stats().bandwidth, params.max_downtime) {
            p.set_extra("postcopy-blocked", json!(why));
            return Err(CommandError::generic(format!("post-copy blocked: {why}")));
        }
        p.set_extra("postcopy-devices", super::source::device_report(&devs));
        p.request_postcopy(true);
        Ok(json!({}))
    });
    let p = Arc::clone(&progress);
    registry.register("migrate-recover", move |args| {
        let uri: MigrationUri = match args.get("uri") {
            Some(Value::String(s)) => s.parse().map_err(CommandError::generic)?,
            _ => return Err(CommandError::generic("parameter 'uri' (a string) is missing")),
        };
        if p.status() != Status::PostcopyPaused {
            return Err(CommandError::generic(
                format!("no post-copy migration is paused (status {:?})", p.status()).to_lowercase(),
            ));
        }
        let l = super::listen(&uri).map_err(CommandError::generic)?;
        let bound = l.uri().to_string();
        p.resume(Resume::Accept(l)).map_err(CommandError::generic)?;
        log::info!("migration: waiting for the source to resume post-copy on {bound}");
        Ok(json!({ "uri": bound }))
    });
    let p = Arc::clone(&progress);
    registry.register("x-postcopy-break", move |_| {
        let n = p.break_sockets();
        if n == 0 {
            return Err(CommandError::generic("no post-copy connection to break"));
        }
        log::warn!("migration: x-postcopy-break shut {n} connections down");
        Ok(json!({ "connections": n }))
    });
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

fn parse_params(
    mut params: super::progress::Parameters,
    args: &Args,
) -> Result<super::progress::Parameters, CommandError> {
    for (k, v) in args {
        let n = v.as_u64().ok_or_else(|| {
            CommandError::generic(format!("parameter '{k}' must be a non-negative integer"))
        })?;
        match k.as_str() {
            // QEMU's downtime-limit is in milliseconds.
            "downtime-limit" | "max-downtime" => params.max_downtime = Duration::from_millis(n),
            "max-bandwidth" => params.max_bandwidth = n,
            "max-postcopy-bandwidth" => params.max_postcopy_bandwidth = n,
            "max-rounds" | "x-max-rounds" => {
                params.max_rounds = u32::try_from(n)
                    .ok()
                    .filter(|&r| r > 0)
                    .ok_or_else(|| CommandError::generic("max-rounds must be between 1 and 2^32-1"))?
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
        for bad in [
            r#"{"max-rounds": 0}"#,
            r#"{"bogus": 1}"#,
            r#"{"max-bandwidth": -1}"#,
            r#"{"max-bandwidth": "x"}"#,
        ] {
            let args: Args = serde_json::from_str(bad).unwrap();
            assert!(parse_params(base, &args).is_err(), "{bad}");
        }
    }
}

//! Bridges a plugin's `log` records to the host's logger.
//!
//! A cdylib has its own copy of the `log` crate and so its own global
//! logger; without this bridge `log::info!` inside a plugin goes nowhere.

use abi_stable::std_types::RStr;

use crate::{LogLevel, LogSinkBox};

struct Bridge {
    sink: LogSinkBox,
}

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        self.sink.log(record.level().into(), RStr::from(record.target()), RStr::from(message.as_str()));
    }

    fn flush(&self) {}
}

/// Install the bridge as this library's logger. Later calls are ignored.
pub fn install(sink: LogSinkBox, max_level: LogLevel) {
    if log::set_boxed_logger(Box::new(Bridge { sink })).is_ok() {
        log::set_max_level(log::Level::from(max_level).to_level_filter());
    }
}

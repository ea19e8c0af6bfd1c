//! The dmhost plugin ABI conformance suite.
//!
//! [`check_library`] loads nothing itself: the host's loader hands it a
//! root module, and it creates devices of every kind against a host double
//! ([`suite_host::SuiteHost`]) that keeps the real host's contract.

mod checks;
pub mod fuzz;
pub mod nfit;
pub mod suite_host;
pub mod vfio;

use std::fmt;

use dmhost_plugin_api::PluginModule_Ref;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// All checks of one plugin library.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: String,
    pub results: Vec<CheckResult>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed).count()
    }
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
    /// A report for a library that failed before any check could run.
    pub fn load_failure(target: &str, error: &str) -> Self {
        let result = CheckResult { name: "load".into(), passed: false, detail: error.into() };
        Self { target: target.into(), results: vec![result] }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            if r.passed {
                writeln!(f, "PASS {}: {}", self.target, r.name)?;
            } else {
                writeln!(f, "FAIL {}: {}: {}", self.target, r.name, r.detail)?;
            }
        }
        Ok(())
    }
}

/// The library under test and the libraries whose vendor VFIO drivers its
/// devices may open (`HostServices::open_vfio_driver` in the host double).
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub module: PluginModule_Ref,
    pub drivers: &'a [PluginModule_Ref],
}

/// Run the conformance checks on a loaded plugin. Its devices can open
/// the VFIO drivers the library itself exports.
pub fn check_module(target: &str, module: PluginModule_Ref) -> Report {
    check_module_with(target, module, &[module])
}

/// Run the conformance checks on a loaded plugin whose devices can open
/// the VFIO drivers of `drivers` (the host loads the libraries beside it).
pub fn check_module_with(target: &str, module: PluginModule_Ref, drivers: &[PluginModule_Ref]) -> Report {
    let mut results = vec![CheckResult { name: "load".into(), passed: true, detail: String::new() }];
    results.extend(checks::run_all(Target { module, drivers }));
    Report { target: target.into(), results }
}

//! Helpers for tests that need KVM.

/// Environment variable that turns a missing KVM into a test failure.
pub const REQUIRE_KVM_ENV: &str = "DMHOST_REQUIRE_KVM";

/// Whether `test` can use KVM. Without `/dev/kvm` it prints a loud SKIPPED
/// line and returns `false`, unless `DMHOST_REQUIRE_KVM=1`, where it panics
/// (the test fails).
pub fn kvm_or_skip(test: &str) -> bool {
    match crate::run::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: {why} and {REQUIRE_KVM_ENV}=1");
            }
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
            false
        }
    }
}

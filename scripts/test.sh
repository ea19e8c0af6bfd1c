#!/usr/bin/env bash
# The test command: sets up what a fresh Debian machine lacks, builds every
# crate (the tests load the plugins as real .so files), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# KVM tests say SKIPPED without /dev/kvm; where it exists a skip is a failure.
if [ -e /dev/kvm ] && [ -z "${DMHOST_REQUIRE_KVM:-}" ]; then
    export DMHOST_REQUIRE_KVM=1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
# The fuzz targets (cargo-fuzz crate outside the workspace) must keep building.
cargo check --manifest-path fuzz/Cargo.toml --bins

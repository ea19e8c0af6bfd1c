#!/usr/bin/env bash
# The main job: build dmhost and its plugins, list them and run the ABI
# conformance suite on them, then boot the demo VM, whose pc-dimm comes from
# its plugin library (prints its checksum line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --release
./target/release/dmhost plugins list -v
./target/release/dmhost plugins check target/release/lib*.so
./target/release/dmhost run examples/demo.toml

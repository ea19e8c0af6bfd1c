#!/usr/bin/env bash
# The main job: build dmhost and its plugins, list them, check them against
# the ABI conformance suite, then boot the demo VM (prints its checksum line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --release
./target/release/dmhost plugins list -v
./target/release/dmhost plugins check target/release/lib*.so
./target/release/dmhost run examples/demo.toml

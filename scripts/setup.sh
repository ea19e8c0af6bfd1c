#!/usr/bin/env bash
# Installs what dmhost's build and tests need on a fresh Debian machine,
# only when missing: a C compiler (test fixtures), acpica-tools (iasl and
# acpiexec check the ACPI tables).
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)  # libfuzzer-sys builds libFuzzer
command -v iasl >/dev/null || need+=(acpica-tools)
command -v acpiexec >/dev/null || need+=(acpica-tools)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
# Formatting and lint checks of the test command.
for c in rustfmt clippy; do
    cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$c"
done

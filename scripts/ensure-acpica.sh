#!/bin/sh
# Install acpica-tools (iasl, acpiexec) when missing. Idempotent; used by the
# ACPI tests (acpi/tests) and by CI. Needs root (or sudo) to install.
set -eu
if command -v iasl >/dev/null 2>&1 && command -v acpiexec >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "ensure-acpica: iasl/acpiexec missing and not root; run: apt-get install -y acpica-tools" >&2
        exit 1
    fi
fi
# Serialise concurrent installs (tests may run in parallel).
LOCK=/tmp/ensure-acpica.lock
exec 9>"$LOCK"
flock 9 2>/dev/null || true
if command -v iasl >/dev/null 2>&1 && command -v acpiexec >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq acpica-tools >&2
command -v iasl >/dev/null 2>&1 && command -v acpiexec >/dev/null 2>&1 || {
    echo "ensure-acpica: acpica-tools installed but iasl/acpiexec still missing" >&2
    exit 1
}

#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ with libFuzzer (cargo-fuzz, nightly,
# AddressSanitizer, debug assertions on) for SECONDS each (default 60), one
# after the other, and prints per target the runs, execs/s and the result.
# Exits non-zero when a target crashed (its input is kept under
# fuzz/artifacts/<target>/). Corpora grow in fuzz/corpus/<target>/ (not
# committed); fuzz/seeds/<target>/, when present, seeds it.
#
#   scripts/fuzz.sh [SECONDS]      FUZZ_TARGETS="a b" to run only some.
set -euo pipefail
secs=${1:-60}
[[ $secs =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
cd "$(dirname "$0")/.."
bash scripts/setup.sh   # a C++ compiler: libfuzzer-sys builds libFuzzer

# Nightly (sanitizer flags) and cargo-fuzz, when missing.
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo +stable install cargo-fuzz --locked

targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
echo "fuzz: building ${targets//$'\n'/ }"
cargo +nightly fuzz build --debug-assertions >/dev/null 2>&1 || cargo +nightly fuzz build --debug-assertions

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
rows=()
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    corpora=("fuzz/corpus/$t")
    [ -d "fuzz/seeds/$t" ] && corpora+=("fuzz/seeds/$t")
    log="$logs/$t.log"
    echo "fuzz: $t for ${secs}s"
    extra=()
    # A device-process packet is up to 64 KiB (libFuzzer's default is 4 KiB).
    [ "$t" = remote_proto ] && extra+=(-max_len=65536)
    rc=0
    cargo +nightly fuzz run --debug-assertions "$t" "${corpora[@]}" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || rc=$?
    runs=$(awk '/^Done [0-9]+ runs/ {print $2}' "$log" | tail -1)
    # No "Done" line after a crash: the last status line's count.
    [ -n "$runs" ] || runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    eps=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$log" | head -1)
        why=$(grep -m1 -E '^==[0-9]+==ERROR|panicked at|deadly signal|timeout after|out-of-memory' "$log" || true)
        result="CRASH (exit $rc) ${artifact:-no artifact}: ${why:-see log}"
        echo "---- $t: last lines of the libFuzzer log ----"
        tail -40 "$log"
    fi
    rows+=("$(printf '%-22s %8ss %12s %10s  %s' "$t" "$secs" "${runs:-?}" "${eps:-?}" "$result")")
done

printf '\n%-22s %9s %12s %10s  %s\n' target time runs execs/s result
printf '%s\n' "${rows[@]}"
exit "$failed"

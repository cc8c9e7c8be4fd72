#!/usr/bin/env bash
# Smoke-test the fuzz targets: with a nightly toolchain and cargo-fuzz, build
# every target and run each for N seconds (first argument, default 10);
# without them, only check that the targets compile on stable.
#
# Usage: fuzz/smoke.sh [SECONDS]
# New corpus entries go to a temporary directory, so the committed seeds are
# the only corpus files left behind; crashes are kept in fuzz/artifacts/<target>/.
set -euo pipefail

secs="${1:-10}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS]  (a positive whole number, default 10)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
targets=(message handshake inner_ip tunnel_config server_datagram icmp dns frag http control endpoint cookie poll)

stable_check() {
    echo "fuzz: checking the fuzz crate on stable"
    cargo check --manifest-path fuzz/Cargo.toml --bins --examples
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (cargo +nightly --version failed): not fuzzing"
    stable_check
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: nightly is present but cargo-fuzz is not (cargo install cargo-fuzz --locked): not fuzzing"
    stable_check
    exit 0
fi

echo "fuzz: building ${#targets[@]} targets with $(cargo +nightly --version)"
cargo +nightly fuzz build

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    echo "fuzz: running $t for ${secs}s"
    mkdir -p "$scratch/$t"
    log="$scratch/$t.log"
    # The first corpus directory receives new inputs; the committed corpus is
    # only read (a target may have none yet).
    corpus=()
    [ -d "fuzz/corpus/$t" ] && corpus=("fuzz/corpus/$t")
    if cargo +nightly fuzz run "$t" "$scratch/$t" "${corpus[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^Done [0-9]+ runs' "$log" || true
    else
        failed+=("$t")
        tail -n 60 "$log"
        echo "fuzz: $t FAILED; reproduce with: cargo +nightly fuzz run $t fuzz/artifacts/$t/<crash-file>"
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: failing targets: ${failed[*]}"
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${secs}s without a crash"

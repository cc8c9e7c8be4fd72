#!/usr/bin/env bash
# The long fuzz run: every target (or the ones named) for SECONDS each
# (default 600), new inputs going into the committed corpus, which is then
# minimised (`cargo fuzz cmin`) so it stays small. Prints each target's
# executions, coverage and corpus size; crashes are kept in
# fuzz/artifacts/<target>/ and make the script fail.
#
# Usage: fuzz/long.sh [-j JOBS] [-t SECONDS] [TARGET...]
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Runs at idle priority (SCHED_IDLE), so it can share a machine.
set -euo pipefail

secs=600
jobs=1
while getopts "j:t:h" opt; do
    case "$opt" in
        j) jobs="$OPTARG" ;;
        t) secs="$OPTARG" ;;
        *) sed -n '2,10p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
for n in "$secs" "$jobs"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz/long.sh: -t and -j take a positive whole number, got '$n'" >&2
        exit 2
    fi
done

cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build
logs="fuzz/target/long-logs"
mkdir -p "$logs"

run_one() { # target
    local t="$1" log="$logs/$1.log"
    mkdir -p "fuzz/corpus/$t"
    if chrt -i 0 cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        # cmin rewrites the directory and would drop the hand-made seeds that
        # add no coverage; they stay, as gen_corpus writes them.
        local seeds="fuzz/target/long-seeds/$t"
        rm -rf "$seeds" && mkdir -p "$seeds"
        find "fuzz/corpus/$t" -maxdepth 1 -name 'seed-*' -exec mv {} "$seeds/" \;
        chrt -i 0 cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" >"$log.cmin" 2>&1 || true
        find "$seeds" -maxdepth 1 -name 'seed-*' -exec mv {} "fuzz/corpus/$t/" \;
        printf '%-16s %12s execs  %6s cov  %5s corpus files  ok\n' "$t" \
            "$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")" \
            "$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)" \
            "$(find "fuzz/corpus/$t" -type f | wc -l)"
    else
        printf '%-16s FAILED: see %s and fuzz/artifacts/%s/\n' "$t" "$log" "$t"
        return 1
    fi
}

failed=0
running=0
for t in "${targets[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
exit "$failed"

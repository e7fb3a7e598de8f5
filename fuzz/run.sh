#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after
# the other at low priority, then minimizes its corpus in place, and prints
# per target: run time, executions, coverage (edges), features and corpus
# size. Exits non-zero if a target crashed; the crashing input is in
# fuzz/artifacts/<target>/ and the log in fuzz/target/fuzz-logs/.
#
#   fuzz/run.sh 600                 # ten minutes per target
#   fuzz/run.sh 60 telnet rinetd    # one minute each for two targets
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs
# cargo-fuzz when it is missing.
set -euo pipefail

usage() {
    echo "usage: $0 SECONDS [TARGET...]" >&2
    exit 64
}
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
seconds=$1
shift

cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "the nightly toolchain is missing; install it with: rustup toolchain install nightly" >&2
    exit 69
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Inputs longer than libFuzzer's default of 4096 bytes, where the parser
# has a bound above that.
max_len() {
    case $1 in
    admin) echo 10000 ;;  # the request head bound is 8192 bytes
    client_hello) echo 17000 ;;  # the hello bound is 16389 bytes (plus 2 of split)
    *) echo 4096 ;;
    esac
}

logs=target/fuzz-logs
mkdir -p "$logs"
nice -n 10 cargo +nightly fuzz build >&2

failed=()
summary=()
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    mkdir -p "corpus/$target"
    echo "fuzzing $target for ${seconds}s (log: fuzz/$log)" >&2
    start=$(date +%s)
    status=0
    nice -n 10 cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    if [[ $status -ne 0 ]]; then
        failed+=("$target")
        summary+=("$(printf '%-11s %6ss %12s execs  cov %6s  ft %7s  CRASHED (status %s, see fuzz/%s)' \
            "$target" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$status" "$log")")
        continue
    fi
    nice -n 10 cargo +nightly fuzz cmin "$target" "corpus/$target" >"$logs/$target.cmin.log" 2>&1
    files=$(find "corpus/$target" -type f | wc -l)
    bytes=$(du -sb "corpus/$target" | cut -f1)
    summary+=("$(printf '%-11s %6ss %12s execs  cov %6s  ft %7s  corpus %5s files %9s bytes' \
        "$target" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$files" "$bytes")")
done

printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi

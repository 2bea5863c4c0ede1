#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/, cargo-fuzz + libFuzzer) on the stable toolchain, without a
# sanitizer (`-s none`; ASan needs nightly).
#
#   bash scripts/fuzz.sh [TARGET|all] [SECONDS]     default: all targets, 60 s each
#
# Each run starts from the corpus kept in the repo (fuzz/corpus/TARGET, read only) and
# writes what it discovers to fuzz/target/corpus/TARGET (not committed). A crash leaves
# its input in fuzz/artifacts/TARGET/ and fails the script: turn it into a unit test and
# a fix, and add the input to fuzz/corpus/TARGET so `cargo test` replays it.
# Prints one line per target: executions, seconds, executions per second.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-all}"
seconds="${2:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing: cargo-fuzz (crates.io)"
  cargo install --locked cargo-fuzz
fi
if [ "$target" = all ]; then
  targets=$(cargo fuzz list --fuzz-dir fuzz)
else
  targets="$target"
fi

summary=()
for t in $targets; do
  work="fuzz/target/corpus/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  log="fuzz/target/$t.log"
  echo "== $t: ${seconds}s"
  # The first corpus directory receives new inputs; the repo's corpus only seeds.
  if ! cargo fuzz run --fuzz-dir fuzz -s none "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "$t: CRASH (input in fuzz/artifacts/$t/; full log $log)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  summary+=("$(printf '%-16s %12s execs %6ss %10s/s cov %s' "$t" "$runs" "$seconds" "$((runs / seconds))" "${cov:-?}")")
done
printf '%s\n' "${summary[@]}"

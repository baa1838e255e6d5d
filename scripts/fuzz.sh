#!/usr/bin/env bash
# Runs fhirlift's fuzz targets with cargo-fuzz, each for a while, two at a time (the machine has
# two cores). Findings land in fuzz/artifacts/<target>/; executions per target are printed at
# the end and kept in fuzz/logs/<target>.log.
#
#   scripts/fuzz.sh                 # every target, 600 s each
#   scripts/fuzz.sh 60 csv_reader   # one target, 60 s
#
# Needs cargo-fuzz (cargo install cargo-fuzz --locked). On a stable toolchain the nightly-only
# flags cargo-fuzz passes are allowed with RUSTC_BOOTSTRAP=1, which this script sets.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_PER_TARGET="${1:-600}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(csv_reader excel_reader ingest template_filters)
fi
export RUSTC_BOOTSTRAP=1
# No sanitizer: fhirlift has no unsafe code, and without one the large dependency tree builds in
# a fraction of the time. Panics and aborts are still caught.
FUZZ_FLAGS=(--sanitizer none --release)

cargo fuzz build "${FUZZ_FLAGS[@]}"

mkdir -p logs
run() {
  local t="$1"
  mkdir -p "corpus/$t" "artifacts/$t"
  # Seeds: the committed ones for the target, then the hostile corpus for the readers.
  local seeds=()
  [ -d "seeds/$t" ] && seeds+=("seeds/$t")
  cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=20 -max_len=1048576 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1 || true
}

# Two at a time.
for ((i = 0; i < ${#TARGETS[@]}; i += 2)); do
  run "${TARGETS[i]}" &
  if [ $((i + 1)) -lt ${#TARGETS[@]} ]; then run "${TARGETS[i + 1]}" & fi
  wait
done

for t in "${TARGETS[@]}"; do
  line=$(grep -E "^Done [0-9]+ runs|stat::number_of_executed_units" "logs/$t.log" | tr '\n' ' ' || true)
  findings=$(find "artifacts/$t" -type f | wc -l)
  echo "$t: ${line:-no summary (see fuzz/logs/$t.log)}; findings: $findings"
done

#!/usr/bin/env bash
# Soak test (not part of CI): a standalone sandbox on 127.0.0.1 answering 10 % of API requests with
# 5xx, 5 % with 429 (Retry-After 1 s), dropping 2 % of connections and losing 2 % of answers after
# storing, with 60-second tokens; a full load of PATIENTS patients and OBSERVATIONS lab
# Observations through `fhirlift run`. Afterwards the server must hold every expected resource
# exactly once (its store is dumped and compared) and the run report must account for every row.
#
#   scripts/soak.sh                     # 10,000 patients, 200,000 Observations, release build
#   scripts/soak.sh 1000 20000          # smaller
#   SOAK_PROFILE=dev scripts/soak.sh 1000 20000    # reuse the debug build (slower run, no build)
#
# Optional: FHIRLIFT_SOAK_SEED (fault RNG seed, default 7), FHIRLIFT_SOAK_TOKEN_TTL (seconds,
# default 60), FHIRLIFT_SOAK_ARGS (extra `fhirlift run` flags, e.g. "--bundle-size 50
# --concurrency 16"). The summary line starts with SOAK.
set -euo pipefail
cd "$(dirname "$0")/.."

export FHIRLIFT_SOAK_PATIENTS="${1:-10000}"
export FHIRLIFT_SOAK_OBSERVATIONS="${2:-200000}"
profile=()
if [ "${SOAK_PROFILE:-release}" = release ]; then
  profile=(--release)
fi
# The logic lives in tests/it/hardening.rs (`soak`), shared with the small version CI runs.
cargo test "${profile[@]}" --test tests -- it::hardening::soak_full --exact --ignored --nocapture 2>&1 |
  grep -E "^SOAK|panicked|test result|assert" || true

#!/usr/bin/env bash
# Runs the seeded fault ledger (tests/e2e/ledger.rs) once per seed, one after the other, each in
# its own test process with its own servers, and prints one line per seed.
#
#   bash scripts/ledger.sh                 # the CI seed and seeds 1..20
#   bash scripts/ledger.sh 7 42 1234       # these seeds
#
# Each run's output is kept in $LEDGER_LOG_DIR (default .data/ledger-logs/seed-N.log); a failing
# run also keeps its data directory (path at the end of its log). Replay one seed with
#   EVENTFLOW_LEDGER_SEED=N cargo test --locked --test e2e ledger -- --test-threads=1 --nocapture
source "$(dirname "$0")/lib.sh"
cd "$REPO"

CI_SEED=20261010
seeds=("$@")
if [ "${#seeds[@]}" -eq 0 ]; then
  mapfile -t seeds < <(echo "$CI_SEED"; seq 1 20)
fi
logs="${LEDGER_LOG_DIR:-$REPO/.data/ledger-logs}"
mkdir -p "$logs"

log "building the e2e tests (target dir: $CARGO_TARGET_DIR)"
cargo build --locked --test e2e --bin eventflow

failed=()
printf '%-12s %-6s %8s  %s\n' seed result seconds log
for seed in "${seeds[@]}"; do
  started=$(date +%s)
  if EVENTFLOW_LEDGER_SEED="$seed" cargo test --locked --test e2e ledger -- --test-threads=1 --nocapture \
    >"$logs/seed-$seed.log" 2>&1; then
    result=PASS
  else
    result=FAIL
    failed+=("$seed")
  fi
  printf '%-12s %-6s %8s  %s\n' "$seed" "$result" "$(($(date +%s) - started))" "$logs/seed-$seed.log"
done
if [ "${#failed[@]}" -gt 0 ]; then
  die "seeds that failed: ${failed[*]}"
fi
log "every seed passed"

#!/usr/bin/env bash
# README command 2: installs what is missing, then runs every test: unit and property tests,
# end-to-end and fault tests against real ClickHouse 18.16 and a real Kafka-protocol broker,
# SQL portability on a current ClickHouse (chdb), alert-rule tests, browser tests.
source "$(dirname "$0")/lib.sh"
cd "$REPO"

install_all
cleanup_leftovers
trap cleanup_leftovers EXIT

started=$(date +%s)
log "building (target dir: $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked

log "format and lints (rustfmt, clippy: warnings are errors)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "unit and property tests"
cargo test --workspace --lib --bins --locked

log "end-to-end and fault tests (real ClickHouse, real broker; one at a time)"
cargo test --locked --test e2e -- --test-threads=1

log "alert rule tests (promtool)"
promtool check rules "$REPO/deploy/prometheus/rules.yml"
python3 "$REPO/scripts/check_runbooks.py"
promtool test rules "$REPO"/deploy/prometheus/tests/*.yml

log "deployment files: compose schema, Kubernetes manifests, cluster SQL on current ClickHouse"
bash "$REPO/scripts/validate_deploy.sh"

log "all tests passed in $(( $(date +%s) - started ))s"

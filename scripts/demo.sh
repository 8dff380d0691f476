#!/usr/bin/env bash
# README command 1: installs what is missing, starts ClickHouse and the Kafka-protocol broker,
# runs collector, processor and API, sends a realistic synthetic day of traffic through the
# collector's HTTP endpoint and prints the overview. `--keep` leaves everything running.
source "$(dirname "$0")/lib.sh"
cd "$REPO"

KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

install_all
log "building eventflow (release)"
cargo build --release --locked --bin eventflow
EF="$CARGO_TARGET_DIR/release/eventflow"

export EVENTFLOW_DEMO_CH_PORT="${EVENTFLOW_DEMO_CH_PORT:-18123}"
export EVENTFLOW_DEMO_KAFKA_PORT="${EVENTFLOW_DEMO_KAFKA_PORT:-19092}"
DEMO="$REPO/.data/demo"
# A previous `--keep` run leaves collector, processor and API running (and ClickHouse and the
# broker, which this run reuses with their data): stop the three, or this run's would not get
# their ports and the old ones would answer with the old admin token.
for p in "$DEMO"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
pkill -f -- "--config $DEMO/eventflow.toml" 2>/dev/null || true
for port in 8080 8082 8081; do
  for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$port/readyz" || break; sleep 0.1; done
  curl -s -o /dev/null "http://127.0.0.1:$port/readyz" && die "port $port is still in use (a service not started by this script?)"
done
rm -rf "$DEMO" && mkdir -p "$DEMO"
"$REPO/scripts/services.sh" start

ADMIN_TOKEN="demo-admin-token-$(date +%s)"
sed -e "s#@CH@#http://127.0.0.1:$EVENTFLOW_DEMO_CH_PORT#" -e "s#@KAFKA@#127.0.0.1:$EVENTFLOW_DEMO_KAFKA_PORT#" \
    -e "s#@DATA@#$DEMO#" -e "s#@ADMIN@#$ADMIN_TOKEN#" "$REPO/deploy/demo/eventflow.toml" > "$DEMO/eventflow.toml"
CFG=(--config "$DEMO/eventflow.toml")

stop_all() {
  for p in "$DEMO"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 1
  "$REPO/scripts/services.sh" stop
}
if [ "$KEEP" -eq 0 ]; then trap stop_all EXIT; fi

"$EF" "${CFG[@]}" migrate
"$EF" "${CFG[@]}" links import "$REPO/deploy/demo/links.csv"
for svc in collector processor api; do
  nohup "$EF" "${CFG[@]}" "$svc" >"$DEMO/$svc.log" 2>&1 &
  echo $! > "$DEMO/$svc.pid"
done
for port in 8080 8082 8081; do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || die "service on :$port did not become ready (logs in $DEMO)"
done
sleep 2 # the collector loads the campaign links

log "sending a synthetic day of traffic through http://127.0.0.1:8080/v1/collect"
"$EF" "${CFG[@]}" simulate --collector http://127.0.0.1:8080 --visitors 600 --hours 20 \
  --links spring-news,partner-fair,ads-brand

log "waiting for the processor to fold everything in"
for _ in $(seq 1 600); do
  accepted=$(curl -sf http://127.0.0.1:8080/metrics | awk '/^eventflow_collector_facts_total\{outcome="accepted"/ {s+=$2} END {print s+0}')
  processed=$(curl -sf http://127.0.0.1:8082/metrics | awk '/^eventflow_processor_facts_total\{/ {s+=$2} END {print s+0}')
  [ "$processed" -ge "$accepted" ] && [ "$accepted" -gt 0 ] && break
  sleep 0.2
done
sleep 2

for client in acme globex; do
  curl -sf -H "Authorization: Bearer $ADMIN_TOKEN" \
    "http://127.0.0.1:8081/v1/clients/$client/statistics/overview?range=7d" > "$DEMO/overview-$client.json"
  python3 "$REPO/scripts/print_overview.py" "$DEMO/overview-$client.json"
done

yesterday=$(date -u -d yesterday +%Y-%m-%d)
log "raw facts vs aggregates (eventflow reconcile)"
"$EF" "${CFG[@]}" reconcile --from "$yesterday" --to "$(date -u -d tomorrow +%Y-%m-%d)"

if [ "$KEEP" -eq 1 ]; then
  log "still running: dashboard http://127.0.0.1:8081/ (token: $ADMIN_TOKEN, client acme)"
  log "stop with: for p in $DEMO/*.pid; do kill \$(cat \$p); done; scripts/services.sh stop"
fi

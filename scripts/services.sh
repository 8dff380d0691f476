#!/usr/bin/env bash
# Local ClickHouse and Kafka-protocol broker (tansu) for the demo and for manual runs, with their
# data under .data/services/. Usage: scripts/services.sh start|stop|status
source "$(dirname "$0")/lib.sh"

DATA="$REPO/.data/services"
CH_HTTP="${EVENTFLOW_DEMO_CH_PORT:-8123}"
KAFKA_PORT="${EVENTFLOW_DEMO_KAFKA_PORT:-9092}"

ch_config() {
  mkdir -p "$DATA/clickhouse/data"
  cat > "$DATA/clickhouse/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$DATA/clickhouse/server.log</log><errorlog>$DATA/clickhouse/error.log</errorlog><console>0</console></logger>
  <http_port>$CH_HTTP</http_port>
  <tcp_port>$((CH_HTTP + 777))</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$DATA/clickhouse/data/</path>
  <tmp_path>$DATA/clickhouse/tmp/</tmp_path>
  <user_files_path>$DATA/clickhouse/user_files/</user_files_path>
  <format_schema_path>$DATA/clickhouse/format_schemas/</format_schema_path>
  <users_config>$DATA/clickhouse/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
XML
  cat > "$DATA/clickhouse/users.xml" <<'XML'
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>::1</ip><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
}

wait_for() { # url seconds
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

start() {
  mkdir -p "$DATA"
  if curl -sf "http://127.0.0.1:$CH_HTTP/ping" >/dev/null 2>&1; then
    log "ClickHouse already answers on :$CH_HTTP"
  else
    ch_config
    log "starting ClickHouse ($(clickhouse-server --version 2>/dev/null | head -1 || echo 18.16)) on :$CH_HTTP"
    nohup /usr/sbin/clickhouse-server --config-file="$DATA/clickhouse/config.xml" >"$DATA/clickhouse/stdout.log" 2>&1 &
    echo $! > "$DATA/clickhouse.pid"
    wait_for "http://127.0.0.1:$CH_HTTP/ping" 60 || die "ClickHouse did not start (see $DATA/clickhouse/error.log)"
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; then
    log "a broker already listens on :$KAFKA_PORT"
  else
    mkdir -p "$DATA/tansu"
    log "starting tansu (Kafka protocol) on :$KAFKA_PORT"
    (cd "$DATA/tansu" && RUST_LOG=warn nohup "$EVENTFLOW_TANSU" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine sqlite://tansu.db >tansu.log 2>&1 & echo $! > "$DATA/tansu.pid")
    local i
    for i in $(seq 1 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null && break
      sleep 0.1
    done
  fi
}

stop() {
  local f
  for f in "$DATA/tansu.pid" "$DATA/clickhouse.pid"; do
    if [ -f "$f" ]; then
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    fi
  done
  sleep 1
  cleanup_leftovers
}

status() {
  curl -sf "http://127.0.0.1:$CH_HTTP/ping" >/dev/null && echo "clickhouse: up on :$CH_HTTP" || echo "clickhouse: down"
  (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null && echo "broker: up on :$KAFKA_PORT" || echo "broker: down"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

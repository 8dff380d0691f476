# Shared by the scripts in this folder: paths, logging and the idempotent installer.
# shellcheck shell=bash

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EVENTFLOW_CACHE="${EVENTFLOW_CACHE:-$HOME/.cache/eventflow}"
# Build outputs and the tansu binary are cached outside the clone, so a second clone on the
# same machine (CI) does not rebuild everything.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EVENTFLOW_CACHE/target}"
TOOLS="$EVENTFLOW_CACHE/tools"
export EVENTFLOW_TANSU="${EVENTFLOW_TANSU:-$TOOLS/bin/tansu}"
TANSU_VERSION="0.6.0"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages the product and its tests need.
APT_PACKAGES=(clickhouse-server clickhouse-client chromium chromium-driver prometheus wrk curl ca-certificates
  python3 python3-pip build-essential pkg-config libssl-dev zlib1g-dev)

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The clickhouse-server package may start a system service; EventFlow runs its own servers.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet clickhouse-server 2>/dev/null; then
    as_root systemctl stop clickhouse-server || true
  fi
}

install_python() {
  if ! python3 -c 'import chdb' >/dev/null 2>&1; then
    log "installing chdb (current ClickHouse, embedded) for the SQL portability tests"
    python3 -m pip install --quiet chdb || python3 -m pip install --quiet --break-system-packages chdb
  fi
}

install_tansu() {
  if [ -x "$EVENTFLOW_TANSU" ] && "$EVENTFLOW_TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return
  fi
  log "building the tansu Kafka-protocol broker $TANSU_VERSION (about 10 minutes, cached in $TOOLS)"
  cargo install --quiet --root "$TOOLS" tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore
}

install_all() {
  command -v cargo >/dev/null || die "cargo (Rust) is required"
  install_apt
  install_python
  install_tansu
}

# Kills processes started from this checkout's .data directory (servers of tests or demos),
# by command line or, for tansu (whose command line has no path), by working directory.
cleanup_leftovers() {
  pkill -f "$REPO/.data/" 2>/dev/null || true
  local pid
  for pid in $(pgrep -f "tansu broker" 2>/dev/null || true); do
    case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in
      "$REPO/.data/"*) kill -9 "$pid" 2>/dev/null || true ;;
    esac
  done
}

# Settings and helpers shared by the deploy scripts (sourced, not run). Every setting can be overridden from the
# environment; the defaults run everything on this machine (loopback).
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # this checkout: scripts and venv
APP_DIR=${APP_DIR:-$PROJECT_DIR}                              # the Flower app `flwr run` submits
DEPLOY_DIR=$(mkdir -p "${DEPLOY_DIR:-$PROJECT_DIR/.deploy}" && cd "${DEPLOY_DIR:-$PROJECT_DIR/.deploy}" && pwd)
SUPERLINK_HOST=${SUPERLINK_HOST:-127.0.0.1}                   # where the SuperLink listens
SUPERLINK_PORT=${SUPERLINK_PORT:-8000}                        # one HTTPS port: Fleet, Control and Runtime APIs
SUPERLINK_ADDRESS=${SUPERLINK_ADDRESS:-127.0.0.1:$SUPERLINK_PORT}  # how nodes and the operator reach it
# the SuperLink's state: a SQLite file (survives a SuperLink restart), or "memory" (Flower's in-memory state: many
# nodes pushing replies at once never meet a locked file, but a restart forgets runs and registered nodes)
SUPERLINK_DATABASE=${SUPERLINK_DATABASE:-$DEPLOY_DIR/superlink/state.db}
CONNECTION=${CONNECTION:-fedxmr}                              # the operator's connection name in config.toml
VENV_BIN=${VENV_BIN:-$PROJECT_DIR/.venv/bin}
CERTS=$DEPLOY_DIR/certs
KEYS=$DEPLOY_DIR/keys

export PATH="$VENV_BIN:$PATH"  # flower-superlink/-supernode start flower-superexec by name from PATH
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export FLWR_HOME=${OPERATOR_FLWR_HOME:-$DEPLOY_DIR/operator}  # the operator's Flower config (connections)

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Write the operator's connection to the SuperLink into $FLWR_HOME/config.toml (TLS, verified against our CA).
ensure_connection() {
  [[ -f $CERTS/ca.crt ]] || die "no CA certificate at $CERTS/ca.crt; run deploy/certs.sh first"
  mkdir -p "$FLWR_HOME"
  cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$CERTS/ca.crt"
TOML
}

# start_bg NAME CMD...: run CMD detached in its own session, log to logs/NAME.log, pid in pids/NAME.pid. Every
# process it starts inherits FEDXMR_DEPLOY_DIR, which is how deploy/stop.sh finds them all (also orphans).
start_bg() {
  local name=$1 pidfile=$DEPLOY_DIR/pids/$1.pid
  shift
  mkdir -p "$DEPLOY_DIR/pids" "$DEPLOY_DIR/logs"
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "$name is already running (pid $(cat "$pidfile"))"
  fi
  FEDXMR_DEPLOY_DIR=$DEPLOY_DIR setsid "$@" > "$DEPLOY_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  echo "$name: pid $!, log $DEPLOY_DIR/logs/$name.log"
}

free_port() { "$VENV_BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

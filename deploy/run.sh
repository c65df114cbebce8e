#!/usr/bin/env bash
# Start a run of this project on the SuperLink and wait for it (`flwr run . <connection> --stream`). `flwr run`
# exits 0 even when the run fails, so the exit status here comes from the run's real status (`flwr ls`).
# Paths in the run config are read by the ServerApp on the SuperLink's machine: give them absolute.
# SIGTERM, SIGHUP and Ctrl-C stop the run this script started (`flwr stop`), so that no run goes on unattended,
# and exit with 128 + the signal number.
#
#   deploy/run.sh --run-config "num-server-rounds=10 data-dir='/srv/flickr8k' out-dir='/srv/runs'"
source "$(dirname "$0")/env.sh"
ensure_connection
cd "$APP_DIR"
stream=$(mktemp)
trap 'rm -f "$stream"' EXIT
flwr run . "$CONNECTION" --stream "$@" > >(tee "$stream") 2>&1 &
child=$!

on_signal() {
  trap '' TERM HUP INT  # a second signal must not interrupt the clean-up
  kill -INT "$child" 2>/dev/null || true
  local run_id
  run_id=$(grep -oE 'Successfully started run [0-9]+' "$stream" | grep -oE '[0-9]+$' | head -n 1 || true)
  if [[ -n $run_id ]]; then
    echo "run.sh: signal $1: stopping run $run_id" >&2
    flwr stop "$run_id" "$CONNECTION" >&2 || echo "run.sh: could not stop run $run_id" >&2
  else
    echo "run.sh: signal $1 before the run started" >&2
  fi
  exit $((128 + $1))
}
trap 'on_signal 15' TERM
trap 'on_signal 1' HUP
trap 'on_signal 2' INT
wait "$child"
# the log stream can end while the run goes on (long silent rounds): wait for the run itself, still stoppable
(cd "$PROJECT_DIR" && exec "$VENV_BIN/python" -m scripts.deploy status --connection "$CONNECTION" --wait) &
child=$!
wait "$child"
status=$?
trap - TERM HUP INT
exit "$status"

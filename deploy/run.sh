#!/usr/bin/env bash
# Start a run of this project on the SuperLink and wait for it (`flwr run . <connection> --stream`). `flwr run`
# exits 0 even when the run fails, so the exit status here comes from the run's real status (`flwr ls`).
# Paths in the run config are read by the ServerApp on the SuperLink's machine: give them absolute.
#
#   deploy/run.sh --run-config "num-server-rounds=10 data-dir='/srv/flickr8k' out-dir='/srv/runs'"
source "$(dirname "$0")/env.sh"
ensure_connection
cd "$APP_DIR"
flwr run . "$CONNECTION" --stream "$@"
cd "$PROJECT_DIR"
exec "$VENV_BIN/python" -m scripts.deploy status --connection "$CONNECTION"

#!/usr/bin/env bash
# The runs on the SuperLink (`flwr ls --format json`) and its registered SuperNodes; with a run id, that run's
# status and its log (`flwr log <run-id> --show`).
#
#   deploy/status.sh [RUN_ID]
source "$(dirname "$0")/env.sh"
ensure_connection
if [[ $# -eq 0 ]]; then
  flwr ls "$CONNECTION" --format json
  flwr supernode list "$CONNECTION"
else
  flwr ls "$CONNECTION" --run-id "$1" --format json
  flwr log "$1" "$CONNECTION" --show
fi

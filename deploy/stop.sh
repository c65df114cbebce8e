#!/usr/bin/env bash
# Stop everything the deploy scripts started from $DEPLOY_DIR: SuperNodes first, then the SuperLink, by the
# process ids in $DEPLOY_DIR/pids (SIGTERM, SIGKILL after a grace period), including the processes they spawned
# (SuperExecs, ServerApp/ClientApp processes), and check that none is left.
#
#   deploy/stop.sh
source "$(dirname "$0")/env.sh"
cd "$PROJECT_DIR"
exec "$VENV_BIN/python" -m scripts.deploy stop --deploy-dir "$DEPLOY_DIR"

#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (only registered node keys may connect), and write
# the operator's connection ($CONNECTION) to $FLWR_HOME/config.toml. Waits until the port accepts connections.
#
#   deploy/superlink.sh
source "$(dirname "$0")/env.sh"
[[ -f $CERTS/superlink.crt ]] || die "no SuperLink certificate in $CERTS; run deploy/certs.sh first"
ensure_connection
mkdir -p "$DEPLOY_DIR/superlink"
database=(--database "$SUPERLINK_DATABASE")
[[ $SUPERLINK_DATABASE == memory ]] && database=()  # no --database: Flower keeps the state in memory
start_bg superlink env FLWR_HOME="$DEPLOY_DIR/superlink/flwr-home" flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/superlink.crt" --ssl-keyfile "$CERTS/superlink.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" "${database[@]}"

pid=$(cat "$DEPLOY_DIR/pids/superlink.pid")
for _ in $(seq 1 120); do
  kill -0 "$pid" 2> /dev/null || { tail -n 20 "$DEPLOY_DIR/logs/superlink.log" >&2; die "the SuperLink exited"; }
  if (exec 3<> "/dev/tcp/${SUPERLINK_ADDRESS%:*}/${SUPERLINK_ADDRESS##*:}") 2> /dev/null; then
    echo "superlink: listening on $SUPERLINK_ADDRESS (connection '$CONNECTION' in $FLWR_HOME/config.toml)"
    exit 0
  fi
  sleep 0.5
done
die "the SuperLink did not listen on $SUPERLINK_ADDRESS within 60 s (log: $DEPLOY_DIR/logs/superlink.log)"

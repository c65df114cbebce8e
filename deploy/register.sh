#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (run by the operator; only registered nodes may join).
#
#   deploy/register.sh node-0 node-1 ...    # registers $DEPLOY_DIR/keys/<name>.pub
source "$(dirname "$0")/env.sh"
ensure_connection
[[ $# -gt 0 ]] || die "usage: deploy/register.sh NODE_NAME..."
for name in "$@"; do
  [[ -f $KEYS/$name.pub ]] || die "no public key $KEYS/$name.pub; run deploy/certs.sh $name first"
  flwr supernode register "$KEYS/$name.pub" "$CONNECTION"
done

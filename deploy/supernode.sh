#!/usr/bin/env bash
# Start one SuperNode: TLS to the SuperLink, authenticated with its own key, its own Flower home, feature cache
# and data directory (normally its materialised shard, see deploy/README.md). Extra `key=value` arguments go into
# its node config, e.g. device='cuda', or partition-id=0 num-partitions=2 for a full dataset folder.
# NODE_THREADS caps the node's torch threads (OMP_NUM_THREADS): several nodes on one machine should share its
# cores rather than each take all of them.
#
#   [NODE_THREADS=1] deploy/supernode.sh NODE_NAME DATA_DIR [key=value ...]
source "$(dirname "$0")/env.sh"
[[ $# -ge 2 ]] || die "usage: deploy/supernode.sh NODE_NAME DATA_DIR [key=value ...]"
name=$1
data=$(cd "$2" && pwd) || die "data directory $2 does not exist"
shift 2
[[ -f $KEYS/$name ]] || die "no private key $KEYS/$name; run deploy/certs.sh $name first"
node_dir=$DEPLOY_DIR/nodes/$name
mkdir -p "$node_dir"
port=${SUPERNODE_PORT:-$(free_port)}  # the node's own runtime API, which its ClientApp processes talk to
start_bg "supernode-$name" env FLWR_HOME="$node_dir/flwr-home" ${NODE_THREADS:+OMP_NUM_THREADS=$NODE_THREADS} \
  flower-supernode \
  --root-certificates "$CERTS/ca.crt" --superlink "$SUPERLINK_ADDRESS" \
  --auth-supernode-private-key "$KEYS/$name" \
  --node-config "data-dir='$data' cache-dir='$node_dir/cache' $*" \
  --host 127.0.0.1 --port "$port"

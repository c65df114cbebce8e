#!/usr/bin/env bash
# Create a CA, the SuperLink's TLS certificate (SAN localhost, 127.0.0.1 and $SUPERLINK_SANS, e.g.
# "DNS:superlink,DNS:link.example.org") and one SuperNode key pair per name (OpenSSH ECDSA P-384, what
# `flwr supernode register` and `flower-supernode --auth-supernode-private-key` take), and the SuperExec secret
# of the SuperLink in process isolation (Docker Compose). Existing files are kept.
#
#   deploy/certs.sh node-0 node-1 ...   -> $DEPLOY_DIR/certs/{ca.crt,ca.key,superlink.crt,superlink.key,superexec.secret}
#                                          $DEPLOY_DIR/keys/<name>{,.pub}
source "$(dirname "$0")/env.sh"
command -v openssl > /dev/null || die "openssl is required"
command -v ssh-keygen > /dev/null || die "ssh-keygen is required"
mkdir -p "$CERTS" "$KEYS"
chmod 700 "$CERTS" "$KEYS"

if [[ ! -f $CERTS/ca.crt ]]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -days 825 -nodes -subj "/CN=fedxmr-ca" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2> /dev/null
  echo "CA: $CERTS/ca.crt"
fi
if [[ ! -f $CERTS/superlink.crt ]]; then
  san="DNS:localhost,IP:127.0.0.1${SUPERLINK_SANS:+,$SUPERLINK_SANS}"
  openssl req -new -newkey rsa:3072 -nodes -subj "/CN=fedxmr-superlink" \
    -keyout "$CERTS/superlink.key" -out "$CERTS/superlink.csr" 2> /dev/null
  printf '%s\n' "subjectAltName=$san" "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" > "$CERTS/superlink.ext"
  openssl x509 -req -sha256 -days 825 -in "$CERTS/superlink.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -extfile "$CERTS/superlink.ext" -out "$CERTS/superlink.crt" 2> /dev/null
  rm -f "$CERTS/superlink.csr" "$CERTS/superlink.ext"
  echo "SuperLink certificate: $CERTS/superlink.crt ($san)"
fi
if [[ ! -f $CERTS/superexec.secret ]]; then  # shared by the SuperLink and its SuperExec in process isolation
  openssl rand -hex 32 | tr -d '\n' > "$CERTS/superexec.secret"
fi
chmod 600 "$CERTS"/*.key "$CERTS/superexec.secret"
for name in "$@"; do
  [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "node name '$name' may only hold letters, digits, '.', '_' and '-'"
  if [[ ! -f $KEYS/$name ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedxmr-$name" -f "$KEYS/$name"
    echo "SuperNode key pair: $KEYS/$name{,.pub}"
  fi
done

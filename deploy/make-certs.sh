#!/usr/bin/env bash
# Makes a tunnel CA, the servers' certificate and one certificate per edge node with OpenSSL,
# until agent enrollment lands (issue 6). Keys stay in OUT_DIR; copy each node's files to
# that node only.
#
#   bash deploy/make-certs.sh OUT_DIR SERVER_NAME NODE...
#
# The node identity is the URI SAN urn:edge-redirector:node:<node-name>; the tunnel server
# takes the node ID from that SAN of the verified certificate and nothing else.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: $0 OUT_DIR SERVER_NAME NODE..." >&2
    exit 2
fi
out=$1 server_name=$2
shift 2
mkdir -p "$out"
cd "$out"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
sign() { # sign <name> <subject> <extensions>
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 90 \
        -extfile <(printf '%b' "$3") -out "$1.crt" 2>/dev/null
    rm -f "$1.csr"
}
if [ ! -f ca.crt ]; then
    key ca.key
    openssl req -x509 -new -key ca.key -days 730 -subj "/CN=edge-redirector tunnel CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.crt
fi
key server.key
sign server "/CN=edge-redirector tunnel server" "subjectAltName=DNS:${server_name}\nextendedKeyUsage=serverAuth"
for node in "$@"; do
    key "agent-${node}.key"
    sign "agent-${node}" "/CN=edge-redirector agent ${node}" \
        "subjectAltName=URI:urn:edge-redirector:node:${node}\nextendedKeyUsage=clientAuth"
done
echo "made: ca.crt, server.crt/key and agent-<node>.crt/key for: $*"
echo "server Secret: kubectl -n edge-redirector create secret generic edge-redirector-tunnel-server --from-file=ca.crt=$out/ca.crt --from-file=tls.crt=$out/server.crt --from-file=tls.key=$out/server.key"

#!/usr/bin/env bash
# Makes a private CA and a broker certificate for HOST (default localhost, also valid for 127.0.0.1).
# Usage: deploy/mosquitto/make-certs.sh OUT_DIR [HOST]
# Writes ca.crt (give to workers, cameras, operators), ca.key (keep offline), server.crt, server.key.
set -euo pipefail
out="${1:?usage: make-certs.sh OUT_DIR [HOST]}"
host="${2:-localhost}"
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=edge-inspect CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout server.key -out server.csr 2>/dev/null
# a broker reached by its address needs it as an IP entry: clients (Python's ssl) do not match an address to a DNS name
if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then name="IP:$host"; else name="DNS:$host"; fi
printf 'subjectAltName=%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$name" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
  -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key
echo "$out: ca.crt server.crt server.key (ca.key: keep it offline)"

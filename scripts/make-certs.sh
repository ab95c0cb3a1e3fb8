#!/usr/bin/env bash
# A local CA and the certificates the secured monitoring stack (deploy/docker-compose.secure.yml) needs, made with
# openssl. For trying TLS and mutual TLS on one machine or a private network; for real deployments use certificates
# of your organisation's CA (see docs/production.md).
#
#   scripts/make-certs.sh [OUT_DIR] [EXTRA_HOST_OR_IP ...]        (make certs)
#
# OUT_DIR (default deploy/secure/certs) receives:
#   ca.crt, ca.key          the CA; ca.key signs the others and should stay on this machine
#   server.crt, server.key  the certificate every server presents: Prometheus, Alertmanager, Pushgateway and the
#                           training endpoints. Its names: localhost, 127.0.0.1, ::1, the compose service names,
#                           host.docker.internal, this host's names, and EXTRA_HOST_OR_IP.
#   client.crt, client.key  the certificate clients present (Prometheus scraping and alerting, Grafana, pushes)
#   client.p12              the same for a browser, to open the UIs directly; its import password is in
#   client.p12.password     (random; P12_PASSWORD sets it)
# Every private key (and the password) is 0600, readable by you only. The containers of the secured stack read
# server.key and client.key as other users: docs/production.md ("Who reads the keys") says which, and how to let
# exactly them in.
# Existing files are kept (delete OUT_DIR, or set FORCE=1, to make new ones). Valid for DAYS (default 825) days.
set -euo pipefail

out="${1:-$(dirname "$0")/../deploy/secure/certs}"
shift || true
days="${DAYS:-825}"
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077

if [[ -f ca.crt && -f server.crt && -f client.crt && "${FORCE:-0}" != 1 ]]; then
    echo "make-certs: certificates already exist in $(pwd) (FORCE=1 replaces them)"
    exit 0
fi

names=(localhost prometheus alertmanager alertmanager-2 pushgateway host.docker.internal)
host="$(hostname 2>/dev/null || true)"
[[ -n "$host" ]] && names+=("$host")
fqdn="$(hostname -f 2>/dev/null || true)"
[[ -n "$fqdn" && "$fqdn" != "$host" ]] && names+=("$fqdn")
ips=(127.0.0.1 ::1)
for extra in "$@"; do
    if [[ "$extra" =~ ^[0-9.]+$ || "$extra" == *:* ]]; then ips+=("$extra"); else names+=("$extra"); fi
done
san=""
for name in "${names[@]}"; do san+="DNS:${name},"; done
for ip in "${ips[@]}"; do san+="IP:${ip},"; done
san="${san%,}"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=dgdn-monitoring local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

sign() {  # name, subject, extensions
    key "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%b' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "/CN=dgdn-monitoring" \
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=${san}\n"
sign client "/CN=dgdn-monitoring client" \
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
( umask 077; printf '%s\n' "${P12_PASSWORD:-$(openssl rand -base64 18)}" > client.p12.password )
openssl pkcs12 -export -in client.crt -inkey client.key -certfile ca.crt -passout file:client.p12.password \
    -out client.p12
rm -f ca.srl

# Certificates are public; keys, the browser bundle and its password are yours alone (see docs/production.md for
# the container users that need read access to server.key and client.key).
chmod 755 .
chmod 644 ./*.crt
chmod 600 ./*.key client.p12 client.p12.password
echo "make-certs: CA and certificates in $(pwd) (server names: ${san})"

#!/usr/bin/env bash
# Debian's PgBouncer for the tests that run the sidecar through it (transaction mode):
# installed with apt when missing.
set -euo pipefail
if [ -x /usr/sbin/pgbouncer ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null; then
    sudo="sudo"
else
    echo "PgBouncer is missing and this user cannot install it: apt-get install pgbouncer" >&2
    exit 1
fi
echo "== installing Debian's pgbouncer for the tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends pgbouncer

#!/usr/bin/env bash
# apt_ensure.sh BINARY PACKAGE: install Debian's PACKAGE with apt when BINARY is missing
# (Chromium for the browser tests, PgBouncer for the pooler tests, promtool for the alert
# rules); nothing is downloaded from anywhere else.
set -euo pipefail
binary="$1"
package="$2"
if [ -x "$binary" ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null; then
    sudo="sudo"
else
    echo "$binary is missing and this user cannot install it: apt-get install $package" >&2
    exit 1
fi
echo "== installing Debian's $package for the tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package"

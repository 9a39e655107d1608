#!/usr/bin/env bash
# Debian's Chromium for the browser tests: installed with apt when missing (the tests never
# download a browser). CHROMIUM_PATH names another binary.
set -euo pipefail
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
    exit 0
fi
if [ -n "${CHROMIUM_PATH:-}" ]; then
    echo "CHROMIUM_PATH=$chromium is not an executable" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null; then
    sudo="sudo"
else
    echo "Chromium is missing and this user cannot install it: apt-get install chromium" >&2
    exit 1
fi
echo "== installing Debian's chromium for the browser tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium

#!/usr/bin/env bash
# Debian's Chromium for the browser tests: installed with apt when missing (the tests never
# download a browser). CHROMIUM_PATH names another binary.
set -euo pipefail
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ -n "${CHROMIUM_PATH:-}" ] && [ ! -x "$chromium" ]; then
    echo "CHROMIUM_PATH=$chromium is not an executable" >&2
    exit 1
fi
exec "$(dirname "$0")/apt_ensure.sh" "$chromium" chromium

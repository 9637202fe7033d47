#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them all.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Debian packages the test suite needs: the real servers the backend tests
# start on loopback (memcached, redis-server, etcd-server and etcd-client),
# faketime for a server whose clock is off, openssl for the TLS tests'
# certificates, chromium, the browser the dashboard and documentation tests
# drive (through Playwright), and prometheus (promtool and the server) for the
# operator kit's alert rules and dashboard.
DEBIAN_PACKAGES=(memcached redis-server etcd-server etcd-client faketime openssl chromium prometheus)
if [ ${#DEBIAN_PACKAGES[@]} -gt 0 ]; then
    missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test,twisted,all,docs]'

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
"$VENV/bin/pytest" "$@"

#!/bin/sh
# Install Debian's chromium for the playground browser test (tests/test_serve.py), if missing.
# Idempotent: does nothing when a chromium binary is already on PATH. Needs root or sudo.
set -eu

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
# The Debian wrapper script prints a harmless shell warning on some hosts; silence it here.
chromium --version 2>/dev/null

#!/usr/bin/env bash
# Installs what megamoe builds and tests with, from Debian packages only.
set -euo pipefail
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    build-essential cmake libgtest-dev nlohmann-json3-dev libcli11-dev libpcre2-dev libcpp-httplib-dev libssl-dev zlib1g-dev libbrotli-dev pkg-config clang >/dev/null

# Node.js and the pinned OpenAI client library (tests/apps/node/package.json and its lockfile) for
# tests/apps/openai_client_test.cpp, which skips without them. Debian's nodejs + npm when no node is
# installed; the package goes to tests/apps/node/node_modules (git-ignored).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --prefix "$(cd "$(dirname "$0")/.." && pwd)/tests/apps/node" --no-audit --no-fund --loglevel=error >/dev/null

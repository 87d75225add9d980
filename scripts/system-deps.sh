#!/usr/bin/env bash
# System packages some tests drive (Debian): Chromium for the web page's browser test, docker-compose v1 to parse
# the compose files without a Docker engine, wrk for the server benchmark's smoke run. Needs root (apt-get);
# installs only what is missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "system packages ready: chromium, docker-compose, wrk"

#!/usr/bin/env bash
# Make sure a dataset is readable by dorat: already there (any lookup location), else Debian's
# package when we may install it, else dorat's own checksummed download.
set -euo pipefail
name="${1:-fashion-mnist}"
PY="${PY:-python3}"
if "$PY" -m dorat data check "$name" >/dev/null 2>&1; then
  "$PY" -m dorat data check "$name"
  exit 0
fi
pkg="dataset-$name"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-cache show "$pkg" >/dev/null 2>&1 \
   || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-cache show "$pkg" >/dev/null 2>&1; }; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"
fi
"$PY" -m dorat data fetch "$name"

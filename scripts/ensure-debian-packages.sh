#!/usr/bin/env bash
# Install Debian packages the tests need when their command is missing: PROGRAM=PACKAGE pairs.
# `make test` calls this (never by hand); as root it runs apt-get directly, otherwise through sudo.
set -euo pipefail
missing=()
for pair in "$@"; do
    program=${pair%%=*}
    package=${pair#*=}
    command -v "$program" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }

#!/usr/bin/env bash
# Installs every Debian package lqd's build, tests and benchmarks need on a fresh machine.
# Usage: deploy/setup.sh, as root (apt-get must be able to write)
set -euo pipefail

packages=(
  build-essential pkg-config meson ninja-build python3 python3-venv python3-pip
  libmicrohttpd-dev libcjson-dev libuv1-dev libglpk-dev glpk-utils
  libopenblas-dev liblapacke-dev
  libopenmpi-dev openmpi-bin iproute2
  curl ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then
  echo "deploy/setup.sh: run as root (it calls apt-get install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"

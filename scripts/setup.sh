#!/usr/bin/env bash
# Installs everything motley needs to build, test and run on Debian 12.
# Idempotent and quiet: packages already present are skipped.
# CUDA and NCCL are not installed here; they are picked up from
# /usr/local/cuda (or CUDA_HOME) when present.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git ccache
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libeigen3-dev libopenblas-dev
  libabsl-dev libgtest-dev libgmock-dev googletest
  nlohmann-json3-dev
  python3 python3-numpy python3-h5py python3-matplotlib
  slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"

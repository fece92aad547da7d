#!/usr/bin/env bash
# Install everything dicom-ai-node needs on a fresh Debian 12 / Ubuntu machine:
# the DICOM peers (dcmtk, Orthanc, dicom3tools) and a Python virtual environment in .venv.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# chromium: the browser tests drive Debian's build through Playwright (no downloaded browser);
# docker-compose and systemd: the deploy-file tests validate compose.yaml and the unit with them
APT_PACKAGES=(dcmtk orthanc orthanc-dicomweb dicom3tools python3-venv chromium docker-compose systemd)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt: installing ${missing[*]}"
    $SUDO apt-get update -qq
    # Orthanc's package would start a system service; the node's tests start their own.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
# pip's output without the machine's "location is ignored" warnings; a failing pip still fails the script
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
pip_install --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "==> installing torch (CPU)"
    pip_install "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "==> installing dicom-ai-node (versions pinned by constraints.txt, the set the tests passed with)"
pip_install -c constraints.txt -e ".[test]"
.venv/bin/python -c "import dicom_ai_node, torch, highdicom, pynetdicom; print('ready: torch', torch.__version__)"

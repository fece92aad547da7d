#!/usr/bin/env bash
# Install everything dicom-ai-node needs on a fresh Debian 12 / Ubuntu machine:
# the DICOM peers (dcmtk, Orthanc, dicom3tools) and a Python virtual environment in .venv.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# chromium: the browser tests drive Debian's build through Playwright (no downloaded browser)
APT_PACKAGES=(dcmtk orthanc orthanc-dicomweb dicom3tools python3-venv chromium)
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
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "==> installing torch (CPU)"
    .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
echo "==> installing dicom-ai-node"
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import dicom_ai_node, torch, highdicom, pynetdicom; print('ready: torch', torch.__version__)"

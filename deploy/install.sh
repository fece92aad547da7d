#!/usr/bin/env bash
# Install dicom-ai-node as a systemd service on a Debian 12 / Ubuntu host. Safe to run again:
# what exists is kept (the user, the venv, an edited config); the code and the units are updated.
#
#   sudo deploy/install.sh            then edit /etc/dicom-ai-node/config.toml and
#   sudo systemctl enable --now dicom-ai-node
#
# What it makes:
#   user and group dicomai (system, no login, home /var/lib/dicom-ai-node)
#   /opt/dicom-ai-node/venv           the node, torch (CPU build by default) and the versions
#                                     of constraints.txt
#   /etc/dicom-ai-node/config.toml    from deploy/systemd/config.toml (root:dicomai 0640),
#                                     storage and the SQLite index under /var/lib/dicom-ai-node
#   /var/lib/dicom-ai-node            dicomai 0750 (the unit's StateDirectory)
#   /etc/systemd/system/dicom-ai-node.service
#   /etc/systemd/system/dicom-ai-node-worker.service   installed, not enabled: only with
#                                     [workers] executor = "celery" (README "Scaling out"), then
#                                     systemctl enable --now dicom-ai-node-worker
#
# Options:
#   --root DIR   install under DIR instead of / (the user goes into DIR/etc/passwd, which must
#                exist; systemctl is not called). For tests and staging: a venv made there only
#                works at that path.
#   --no-pip     make the venv without pip and install nothing into it (tests; offline)
# Environment: PYTHON (python3), TORCH_VERSION (2.13.0), TORCH_INDEX_URL (PyTorch's CPU index;
#   e.g. https://download.pytorch.org/whl/cu128 for a CUDA build on a GPU host).
set -euo pipefail

ROOT=""
PIP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$(realpath "${2:?--root needs a folder}"); shift 2 ;;
        --no-pip) PIP=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
USER_NAME=dicomai
PREFIX=/opt/dicom-ai-node
VENV=$PREFIX/venv
CONFIG_DIR=/etc/dicom-ai-node
STATE_DIR=/var/lib/dicom-ai-node
UNITS=(dicom-ai-node.service dicom-ai-node-worker.service)

say() { echo "==> $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and writes to /opt, /etc, /var/lib)"
if [ -n "$ROOT" ]; then
    [ -f "$ROOT/etc/passwd" ] || die "--root $ROOT: $ROOT/etc/passwd not found"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11 (pyproject.toml requires >= 3.11)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot make a venv: apt-get install python3-venv"

# An entry of DIR/etc/passwd or /etc/group (under --root only the files there count).
entry() {  # entry passwd|group NAME
    if [ -n "$ROOT" ]; then
        grep -m1 "^$2:" "$ROOT/etc/$1" || true
    else
        getent "$1" "$2" || true
    fi
}

# 1. the system user
if [ -z "$(entry passwd "$USER_NAME")" ]; then
    say "creating system user $USER_NAME"
    prefix=()
    [ -n "$ROOT" ] && prefix=(--prefix "$ROOT")
    useradd "${prefix[@]}" --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "dicom-ai-node" "$USER_NAME"
else
    say "user $USER_NAME exists"
fi
uid=$(entry passwd "$USER_NAME" | cut -d: -f3)
gid=$(entry group "$USER_NAME" | cut -d: -f3)
[ -n "$uid" ] && [ -n "$gid" ] || die "user or group $USER_NAME not found after useradd"

# 2. folders (numeric owners: under --root the user is not known to this host)
install -d -m 0755 "$ROOT$PREFIX"
install -d -m 0750 -o "$uid" -g "$gid" "$ROOT$STATE_DIR"
install -d -m 0750 -o 0 -g "$gid" "$ROOT$CONFIG_DIR"

# 3. the config, written once: an existing one is the site's and is kept
if [ -e "$ROOT$CONFIG_DIR/config.toml" ]; then
    say "keeping $CONFIG_DIR/config.toml"
else
    say "writing $CONFIG_DIR/config.toml (storage under $STATE_DIR)"
    install -m 0640 -o 0 -g "$gid" "$SOURCE/deploy/systemd/config.toml" "$ROOT$CONFIG_DIR/config.toml"
fi

# 4. the venv
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    say "creating $VENV"
    if [ "$PIP" -eq 1 ]; then
        "$PYTHON" -m venv "$ROOT$VENV"
    else
        "$PYTHON" -m venv --without-pip "$ROOT$VENV"
    fi
fi
if [ "$PIP" -eq 1 ]; then
    pip=("$ROOT$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -c "$SOURCE/constraints.txt")
    if ! "$ROOT$VENV/bin/python" -c "import torch" 2>/dev/null; then
        say "installing torch $TORCH_VERSION from $TORCH_INDEX_URL"
        "${pip[@]}" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
            "torch==$TORCH_VERSION"
    fi
    say "installing dicom-ai-node from $SOURCE (versions of constraints.txt)"
    "${pip[@]}" "$SOURCE"
    # the config is checked as the node will read it (no database is touched)
    "$ROOT$VENV/bin/python" -c 'import sys; from dicom_ai_node.config import load_config; load_config(sys.argv[1])' \
        "$ROOT$CONFIG_DIR/config.toml" || die "$CONFIG_DIR/config.toml is refused (above)"
else
    say "--no-pip: nothing installed into $VENV"
fi

# 5. the units (neither is enabled here; the worker only runs with the Celery executor)
install -d -m 0755 "$ROOT/etc/systemd/system"
for unit in "${UNITS[@]}"; do
    install -m 0644 "$SOURCE/deploy/systemd/$unit" "$ROOT/etc/systemd/system/$unit"
done
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "installed. Edit $CONFIG_DIR/config.toml (callers, PACS, rules), then: systemctl enable --now dicom-ai-node"
say "with [workers] executor = \"celery\" also: systemctl enable --now dicom-ai-node-worker"

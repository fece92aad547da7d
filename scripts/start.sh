#!/usr/bin/env bash
# Set up (if needed) and start the node on the embedded default: SQLite, local storage,
# bundled models, as configured in config.toml (or the file given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/dicom-ai-node --config "${1:-config.toml}" serve

#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, integration tests with real peers included
# (dcmtk, Orthanc, dciodvfy, PostgreSQL). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# PostgreSQL tests use the machine's server (127.0.0.1:5432); start it when it is installed but down.
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    version=$(ls /etc/postgresql 2>/dev/null | head -1)
    [ -n "$version" ] && pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The README's test command: provision this machine (idempotent), then run the
# whole suite as root.  Any skipped test is a failure: the kernel tests must run.
set -euo pipefail
cd "$(dirname "$0")/.."
./vm/provision.sh
report=$(mktemp)
trap 'rm -f "$report"' EXIT
set +e
.venv/bin/python -m pytest -p no:cacheprovider -rs "$@" 2>&1 | tee "$report"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
if grep -qE '^SKIPPED|[0-9]+ skipped' "$report"; then
    echo "test.sh: some tests were skipped; every test must run here (root, bpffs, XDP)" >&2
    exit 1
fi

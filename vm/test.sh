#!/usr/bin/env bash
# The README's test command: provision this machine (idempotent), then run the
# suite as root.  Any pytest arguments pass through (./vm/test.sh -k vswitch).
# Every test that runs must really run and pass: a skipped, xfailed or xpassed
# test is a failure (the kernel tests must run here: root, bpffs, XDP).  With no
# arguments (as CI runs it) the whole suite must run: a deselected test is a
# failure too; with arguments, deselecting is the caller's choice.
set -euo pipefail
cd "$(dirname "$0")/.."
./vm/provision.sh
report=$(mktemp)
trap 'rm -f "$report"' EXIT
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@" 2>&1 | tee "$report"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi

# pytest's last line of counts, e.g. "==== 561 passed, 2 skipped, 1 xfailed in 12.3s ===="
summary=$(sed 's/\x1b\[[0-9;]*m//g' "$report" | grep -E '^(=+ )?[0-9]+[ /].* in [0-9.]+s' | tail -n 1 || true)
if [ -z "$summary" ]; then
    echo "test.sh: FAILED: no line of counts from pytest (-qq?), cannot check that every test ran" >&2
    exit 1
fi
count() { grep -oE "[0-9]+ ($1)" <<<"$summary" | paste -sd, - | sed 's/,/, /g'; }
not_run=$(count "skipped|xfailed|xpassed" || true)
deselected=""
if [ $# -eq 0 ]; then
    deselected=$(count "deselected" || true)
fi
if [ -n "$not_run" ]; then
    echo "test.sh: FAILED: $not_run (listed in the short test summary above):" \
         "every test must run and pass here (root, bpffs, XDP), none may be skipped or marked xfail" >&2
fi
if [ -n "$deselected" ]; then
    echo "test.sh: FAILED: $deselected: run with no arguments, the whole suite must run;" \
         "something deselects tests (-m/-k in addopts or PYTEST_ADDOPTS, a conftest hook)" >&2
fi
if [ -n "$not_run$deselected" ]; then
    exit 1
fi

#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): installs what the tests
# need on a fresh machine, builds fasteer, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch (on this project's machines pip takes it from local disk);
# fasteer itself only asks for torch>=2.4.
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PY" -m fasteer info
exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"

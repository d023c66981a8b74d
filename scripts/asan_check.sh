#!/usr/bin/env bash
# The C++ op under AddressSanitizer.
#
# Builds fasteer._C with -fsanitize=address into a temporary directory (beside a copy of
# the fasteer package, so the installed build is left alone), checks that the sanitizer
# is live (a deliberately short buffer handed to the raw extension must be reported),
# then runs the op property tests and the op error tests against it with libasan
# preloaded. Exit status 0 only with zero ASan reports and every test passing.
#
#   scripts/asan_check.sh [extra pytest args]
#
# Environment: PYTHON (default python3), CXX (default g++; ASan needs gcc or clang),
# FASTEER_PROPERTY_EXAMPLES (examples per property test, default 120),
# ASAN_KEEP=1 keeps the temporary directory. About 1-2 minutes on 4 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fasteer-asan.XXXXXX")
[ "${ASAN_KEEP:-0}" = "1" ] || trap 'rm -rf "$TMP"' EXIT

LIBASAN=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "asan_check: $CXX has no libasan.so (install gcc's libasan)" >&2
    exit 2
fi

echo "== building fasteer._C with -fsanitize=address into $TMP"
# the package, without its compiled modules; the ASan module goes in their place
mkdir -p "$TMP/pkg"
cp -r fasteer "$TMP/pkg/"
find "$TMP/pkg/fasteer" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
EXT=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PBINC=$("$PY" -c 'import pybind11; print(pybind11.get_include())')
ARCH=""
case "$(uname -m)" in x86_64|amd64) ARCH="-march=x86-64-v2";; esac
# the flags of setup.py's build, plus the sanitizer (at -O1: readable reports, fast enough)
"$CXX" -O1 -g -fsanitize=address -fno-omit-frame-pointer -std=c++17 -fPIC \
    -fvisibility=hidden -fopenmp-simd -ffp-contract=off $ARCH \
    -DFASTEER_CPU_ARCH_NAME="\"${ARCH#-march=}+asan\"" \
    -I"$ROOT/csrc" -I"$PYINC" -I"$PBINC" \
    "$ROOT/csrc/bindings.cpp" "$ROOT"/csrc/cpu/*.cpp \
    -shared -o "$TMP/pkg/fasteer/_C$EXT"

export PYTHONPATH="$TMP/pkg${PYTHONPATH:+:$PYTHONPATH}"
# libstdc++ too: python is not linked against it, and ASan's __cxa_throw interceptor must
# find it at start-up (torch throws C++ exceptions through the dispatcher)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
# python and torch allocate for the process lifetime: leak reports would be noise
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$TMP/asan"
cd "$TMP"   # python -m puts the working directory first on sys.path: the copy, not $ROOT

"$PY" - "$TMP" <<'EOF'
import sys
import fasteer._C as C
assert C.__file__.startswith(sys.argv[1]), f"imported {C.__file__}, not the ASan build"
print("asan_check: using", C.__file__, "-", C.build_info())
EOF

echo "== sanity: a short buffer handed to the raw extension must be reported"
if ASAN_OPTIONS="${ASAN_OPTIONS/log_path=$TMP\/asan/log_path=$TMP/canary}" "$PY" - <<'EOF'
import torch
import fasteer._C as C
d = 64
h = torch.randn(1, d)                      # one row, while n = 4 rows are claimed below
out = torch.empty(4, d)
z = torch.zeros(4, dtype=torch.int32)
g = torch.zeros(4, dtype=torch.uint8)
meta, params, bank = torch.zeros(1, 1, 4, dtype=torch.int32), torch.zeros(1, 1, 8), torch.zeros(1, d)
C.steer_norm(h.data_ptr(), out.data_ptr(), 4, d, d, d, 0, z.data_ptr(), g.data_ptr(),
             meta.data_ptr(), params.data_ptr(), bank.data_ptr(), 1, 1, 1, 0, 0, 1, 1e-6, 0.0,
             True, 0, 0, 1)
EOF
then
    echo "asan_check: the sanitizer did not catch an out-of-bounds read; is it active?" >&2
    exit 1
fi
if ! grep -qs "heap-buffer-overflow" "$TMP"/canary*; then
    echo "asan_check: no heap-buffer-overflow report from the canary" >&2
    cat "$TMP"/canary* 2>/dev/null | head -20 >&2
    exit 1
fi
echo "asan_check: canary reported (sanitizer live)"

echo "== op tests against the ASan build"
set +e
"$PY" -m pytest -q -p no:cacheprovider --rootdir="$ROOT" \
    "$ROOT/tests/test_op_properties.py" "$ROOT/tests/test_steer_norm_errors.py" \
    "$ROOT/tests/test_sae_replace_op.py" \
    "$ROOT/tests/test_steer_norm_backends.py" -k "not triton" "$@"
status=$?
set -e
reports=$(cat "$TMP"/asan.* 2>/dev/null | grep -c "^==[0-9]*==ERROR: AddressSanitizer" || true)
if [ "$reports" != "0" ]; then
    echo "asan_check: $reports AddressSanitizer report(s):" >&2
    cat "$TMP"/asan.* >&2
    exit 1
fi
if [ "$status" != "0" ]; then
    echo "asan_check: tests failed (exit $status), no ASan report" >&2
    exit "$status"
fi
echo "asan_check: OK, 0 AddressSanitizer reports"

#!/usr/bin/env bash
# CI: the C control plane under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# 1. csrc/test_ctl.c, a standalone stress test (forked workers, random SIGKILLs,
#    reclaim, abandoned epochs, pinned slots), built with -fsanitize and run.
# 2. The Python extensions (_core, _kernels) built with SHMFEED_SANITIZE=1 in a
#    scratch copy of the package, loaded into CPython with libasan/libubsan
#    preloaded, running the fault-injection, stress, order and array-source tests
#    (the last two drive the workers' C loop, csrc/gather.c, and the order, csrc/order.c).
# Any sanitizer report fails the step (-fno-sanitize-recover, halt_on_error).
# About a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHMFEED_WERROR=1  # the project's own builds fail on any compiler warning
CC=${CC:-gcc}
work=$(mktemp -d /tmp/shmfeed-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT

flags=(-std=c11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined
       -fno-sanitize-recover=all -Wall -Wextra -Werror -Icsrc)
# handle_segv=0: the fault tests segfault a worker on purpose and expect SIGSEGV.
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=0:handle_segv=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

echo "+ test_ctl (ASan + UBSan)"
"$CC" "${flags[@]}" csrc/ctl.c csrc/test_ctl.c -o "$work/test_ctl"
"$work/test_ctl" 10 3000

echo "+ Python extension (ASan + UBSan) under the fault tests"
mkdir -p "$work/pkg"
cp -r csrc shmfeed setup.py pyproject.toml README.md RELIABILITY.md tests "$work/pkg/"
rm -f "$work/pkg"/shmfeed/*.so
(cd "$work/pkg" && SHMFEED_SANITIZE=1 CC="$CC" python setup.py -q build_ext --inplace >/dev/null 2>&1)
# CPython itself is not instrumented: the runtime must be loaded first, and leak
# detection is off (the interpreter keeps its own allocations until exit).
preload="$("$CC" -print-file-name=libasan.so) $("$CC" -print-file-name=libubsan.so)"
# (test_ctl already ran above; a shorter soak keeps the step short.  RSS under ASan
# swings by tens of MB between identical runs: the memory-at-scale test is left out.)
(cd "$work/pkg" && LD_PRELOAD="$preload" PYTHONPATH="$work/pkg" SHMFEED_SOAK_BATCHES=20000 \
    python -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_stress.py tests/test_order.py tests/test_sources.py \
    tests/test_order_once.py \
    -k "not c_stress and not memory_of_a_thousand")

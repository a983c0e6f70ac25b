"""Every test must leave no child process, no fd, no mapping of a ring and nothing in
/dev/shm behind.  The checks wait a little (workers are given STOP_TIMEOUT_S to go)
but never forever."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import time

import psutil
import pytest

# The leak fixture's own test (test_faults.py) shortens it: its leaks never go away.
LEAK_WAIT_S = float(os.environ.get("SHMFEED_TEST_LEAK_WAIT_S", 3.0))
# Keras picks its backend once, at its first import (tests/test_core.py imports it too):
# the JAX one, which test_keras.py trains with; importing it does not start JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _ring_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("shmfeed-ring" in line for line in f)


# shmfeed's own entries in /dev/shm start with this (it makes none today: its rings are
# memfds).  Other programs' entries (another test run, torch, a browser) are not ours to
# judge.  The test of this fixture runs it with a prefix of its own, so that the entry it
# leaks on purpose is not taken for a leak by a copy of the suite running beside it.
SHM_PREFIX = os.environ.get("SHMFEED_TEST_SHM_PREFIX", "shmfeed")


def _shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _orphans(names: set[str]) -> set[str]:
    """Those of `names` that no live process has open or mapped: a leak, unlike an
    entry some other program on the machine is using right now."""
    if not names:
        return names
    used = set()
    for proc in psutil.process_iter():
        try:
            for m in proc.memory_maps(grouped=True):
                used.add(os.path.basename(m.path))
            for f in proc.open_files():
                used.add(os.path.basename(f.path))
        except (psutil.Error, OSError):
            continue
    return {n for n in names if n not in used and os.path.exists(f"/dev/shm/{n}")}


@pytest.fixture(autouse=True)
def no_leaks(request):
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_fds = _fds()
    before_maps = _ring_mappings()
    before_shm = _shm()
    yield
    gc.collect()
    deadline = time.monotonic() + LEAK_WAIT_S
    while True:
        children = [p for p in me.children(recursive=True) if p.pid not in before_children]
        children = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        fds = _fds() - before_fds
        maps = _ring_mappings() - before_maps
        shm = _orphans(_shm() - before_shm)
        if not (children or fds or maps > 0 or shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        gc.collect()
    for p in children:  # do not let one leak cascade into every later test
        p.kill()
    problems = []
    if children:
        problems.append(f"child processes left: {[(p.pid, p.name()) for p in children]}")
    if fds:
        problems.append(f"fds left open: {sorted(fds)} -> {[_readlink(fd) for fd in sorted(fds)]}")
    if maps > 0:
        problems.append(f"{maps} mapping(s) of a shmfeed ring still in this process")
    if shm:
        problems.append(f"/dev/shm entries left: {sorted(shm)}")
    if problems:
        pytest.fail("; ".join(problems))


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def freeze_heap() -> None:
    """Take what is on the heap now (modules, above all) out of the garbage collector's
    sight: the leak check's collection after every test then scans only what tests
    made since, not ~0.1-0.25 s of modules (with keras and jax, ~330k objects).  Called
    where no test's object is alive (after collection; in the module fixtures that
    import jax or keras, after the previous test's leak check collected its garbage),
    so nothing a test leaks is hidden from that collection."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session):
    freeze_heap()


@pytest.fixture(scope="module")
def shmfeed_jax_imported():
    """`import shmfeed.jax` starts the fork server (a process and its socket): done
    before the per-test leak check looks, by the modules that test shmfeed.jax
    (`pytestmark = pytest.mark.usefixtures("shmfeed_jax_imported")`)."""
    importlib.import_module("shmfeed.jax")
    freeze_heap()


def pytest_configure(config):
    # A runner that starts the suite as a background job of a non-interactive shell
    # (`nohup cmd &`) hands it SIGINT ignored, and every process it starts inherits
    # that, so the Ctrl-C tests could deliver none. The suite tests Ctrl-C: take it back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "imports_big: imports keras, ray, datasets or s3fs into the test process; "
        "runs after the other fork tests (pytest_collection_modifyitems)")


def pytest_collection_modifyitems(config, items):
    """Tests that start JAX's backend in this process run last (modules named for jax
    or keras, or with `STARTS_JAX = True`): once it runs in this process, every
    later Loader starts its workers from a fresh interpreter instead of forking, and
    the other tests should exercise the fork path they were written for.  Just before
    them run the tests that import a big package into this process (modules with
    `IMPORTS_BIG = True`, tests marked `imports_big`): it stays for every later test,
    and every fork of a process of ~300 MB more costs ~0.1 s more (tests/_lazy.py)."""
    def phase(item) -> int:  # a module says so (STARTS_JAX), or its name does
        module = item.module
        if module is not None and (getattr(module, "STARTS_JAX", False)
                                   or any(n in module.__name__ for n in ("jax", "keras"))):
            return 2
        return int(getattr(module, "IMPORTS_BIG", False) or item.get_closest_marker("imports_big") is not None)
    items.sort(key=phase)

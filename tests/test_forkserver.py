"""The fork server: worker pools of a loader made after JAX started come from a copy
of the training process taken at `import shmfeed.jax` / `shmfeed.keras`, not from a
fresh interpreter.  Real interpreters, run as scripts people write: no `__main__`
guard, the dataset defined after JAX started (in `__main__`, holding a lambda) or in a
module that was still being imported when the copy was taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _procs import exited_after

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_TIMEOUT_S = 90.0
GONE_S = 5.0  # every process of a killed script's pools is gone within this

# A module that imports shmfeed.jax half-way through its body, and defines the dataset
# after it: the server's copy holds it half-defined.
MYLIB = """
import numpy as np
import shmfeed.jax

import time

class Squares:
    def __init__(self, n, delay_s=0.0):
        self.n, self.shift, self.delay_s = n, 0, delay_s
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return np.full((3,), i * i + self.shift, np.int64)
    def on_epoch_end(self):
        self.shift += 1000
"""

PRELUDE = """
import json, os, sys, time
import numpy as np
import mylib                      # starts the fork server (import shmfeed.jax inside)
import jax.numpy as jnp
import shmfeed

with open(os.environ["BODY_LOG"], "a") as f:
    f.write(f"body ran in {os.getpid()}\\n")
jnp.zeros(3).block_until_ready()  # JAX's backend runs from here on
server = getattr(shmfeed._processes.forkserver._server, "pid", None)  # None: no server
"""


def _script(tmp_path: Path, body: str) -> Path:
    (tmp_path / "mylib.py").write_text(textwrap.dedent(MYLIB))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
    return script


def _env(tmp_path: Path, **extra: str) -> dict:
    return dict(os.environ, BODY_LOG=str(tmp_path / "body.log"), PYTHONPATH=str(ROOT), **extra)


def _run(tmp_path: Path, body: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, str(_script(tmp_path, body))], capture_output=True,
                         text=True, timeout=SCRIPT_TIMEOUT_S, env=_env(tmp_path, **env), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


def test_after_jax_starts_pools_fork_from_the_server_and_the_script_runs_once(tmp_path):
    result = _run(tmp_path, """
        class InMain:                       # defined after JAX started, holds a lambda
            def __init__(self):
                self.f = lambda i: i + 7
            def __len__(self):
                return 40
            def __getitem__(self, i):
                return np.full((2,), self.f(i), np.int32)

        out = {"server": server}
        ds = mylib.Squares(50)
        with shmfeed.Loader(ds, batch_size=5, num_workers=2, shuffle=True, seed=3) as loader:
            out["method"] = loader.start_method
            out["ppid"] = __import__("psutil").Process(loader.pool_pid).ppid()
            epochs = [sorted(int(v) for b in loader for v in b[:, 0]) for _ in range(3)]
            out["hooked"] = [e == sorted(i * i + k * 1000 for i in range(50)) for k, e in enumerate(epochs)]
            out["pool_kept"] = loader.pool_pid
        with shmfeed.Loader(InMain(), batch_size=4, num_workers=2) as loader:
            out["in_main"] = [int(v) for b in loader for v in b[:, 0]] == [i + 7 for i in range(40)]
            out["method2"] = loader.start_method
        print(json.dumps(out))
    """)
    assert result["method"] == result["method2"] == "forkserver"
    assert result["ppid"] == result["server"]  # the supervisor is the server's child
    assert result["hooked"] == [True, True, True]  # on_epoch_end's new state reached the workers
    assert result["in_main"]
    assert len((tmp_path / "body.log").read_text().splitlines()) == 1  # never re-run
    assert "fresh interpreter" not in result["stderr"]
    assert exited_after([result["server"]], GONE_S) is not None  # left with the script


def test_workers_from_the_server_see_the_environment_and_directory_the_script_has_now(tmp_path):
    # The server was forked at `import mylib`: credentials exported, a variable removed
    # and a chdir made since must reach the workers as they would through a fork.
    (tmp_path / "elsewhere").mkdir()
    result = _run(tmp_path, """
        os.environ["SHMFEED_TEST_KEY"] = "s3cr\u00e9t"
        del os.environ["SHMFEED_TEST_GONE"]
        os.chdir("elsewhere")
        here = os.getcwd()

        class Env:
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return np.array([os.environ.get("SHMFEED_TEST_KEY") == "s3cr\u00e9t",
                                 "SHMFEED_TEST_GONE" not in os.environ, os.getcwd() == here])

        with shmfeed.Loader(Env(), batch_size=2, num_workers=2) as loader:
            method = loader.start_method
            seen = [b.tolist() for b in loader]
        print(json.dumps({"method": method, "seen": seen}))
    """, SHMFEED_TEST_GONE="set when the server started")
    assert result["method"] == "forkserver"
    assert result["seen"] == [[[True, True, True]] * 2] * 2


def test_a_process_forked_from_the_training_process_does_not_share_its_server(tmp_path):
    result = _run(tmp_path, """
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"%d" % (shmfeed._processes.forkserver._server is None))
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps({"child_dropped_it": os.read(r, 8) == b"1",
                          "still_ours": shmfeed._processes.forkserver.running()}))
    """)
    assert result == result | {"child_dropped_it": True, "still_ours": True}


def test_no_automatic_server_where_the_process_already_holds_more_memory_than_allowed(tmp_path):
    script = tmp_path / "big.py"
    script.write_text(textwrap.dedent("""
        import json, numpy as np
        data = np.ones(64 * 2**20 // 8)   # 64 MiB of private memory, above the 16 MiB allowed
        import shmfeed.jax
        print(json.dumps({"running": shmfeed._processes.forkserver.running(),
                          "asked": shmfeed.start_fork_server()}))
        shmfeed._processes.forkserver.stop()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S, env=_env(tmp_path, SHMFEED_FORK_SERVER_MAX_MB="16"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"running": False, "asked": True}
    assert "no fork server started: this process holds" in out.stderr
    assert "SHMFEED_FORK_SERVER_MAX_MB" in out.stderr


def test_a_dead_fork_server_falls_back_to_a_fresh_interpreter(tmp_path):
    result = _run(tmp_path, """
        import signal
        import psutil
        def dead(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 20  # dead before the loader asks it (slow under load)
        while not dead(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        with shmfeed.Loader(mylib.Squares(20), batch_size=5, num_workers=2) as loader:
            got = sorted(int(v) for b in loader for v in b[:, 0])
            print(json.dumps({"method": loader.start_method, "ok": got == [i * i for i in range(20)]}))
    """)
    assert result == result | {"method": "spawn", "ok": True}


def test_forkserver_asked_where_none_can_start_is_a_clear_error(tmp_path):
    result = _run(tmp_path, """
        try:
            shmfeed.Loader(mylib.Squares(20), batch_size=5, num_workers=2, start_method="forkserver")
            print(json.dumps({"raised": None}))
        except shmfeed.SpecError as exc:
            print(json.dumps({"raised": str(exc), "server": server}))
    """, SHMFEED_FORK_SERVER="0")
    assert "`start_method='forkserver'` needs a fork server" in result["raised"]
    assert "JAX's backend already runs" in result["raised"]


def test_a_supervisor_from_the_server_killed_is_reported_and_replaced(tmp_path):
    result = _run(tmp_path, """
        import signal
        ds = mylib.Squares(200, delay_s=0.002)
        loader = shmfeed.Loader(ds, batch_size=4, num_workers=2)
        first = loader.pool_pid
        error = None
        try:
            for k, _ in enumerate(loader):
                if k == 3:
                    os.kill(first, signal.SIGKILL)
        except shmfeed.WorkerError as exc:
            error = str(exc)
        want = [i * i + ds.shift for i in range(200)]
        got = sorted(int(v) for b in loader for v in b[:, 0])
        print(json.dumps({"error": error, "first": first, "second": loader.pool_pid,
                          "method": loader.start_method, "ok": got == want}))
        loader.close()
    """)
    assert f"supervisor (pid {result['first']}) was killed by SIGKILL" in result["error"]
    assert result["second"] != result["first"]
    assert result["method"] == "forkserver" and result["ok"]


def test_a_supervisor_that_died_between_epochs_is_replaced_at_the_next(tmp_path):
    result = _run(tmp_path, """
        import signal
        ds = mylib.Squares(40)
        with shmfeed.Loader(ds, batch_size=4, num_workers=2) as loader:
            epochs = [sorted(int(v) for b in loader for v in b[:, 0])]
            first = loader.pool_pid
            os.kill(first, signal.SIGKILL)
            time.sleep(0.2)
            epochs.append(sorted(int(v) for b in loader for v in b[:, 0]))
            print(json.dumps({"ok": epochs == [[i * i + k * 1000 for i in range(40)] for k in (0, 1)],
                              "replaced": loader.pool_pid != first, "method": loader.start_method}))
    """)
    assert result == result | {"ok": True, "replaced": True, "method": "forkserver"}
    assert "between epochs; starting a new pool" in result["stderr"]


def test_killing_the_training_process_leaves_no_pool_process(tmp_path):
    script = _script(tmp_path, """
        loader = shmfeed.Loader(mylib.Squares(10**6), batch_size=4, num_workers=2)
        it = iter(loader)
        next(it)
        deadline = time.monotonic() + 5
        while len(loader.worker_pids) < 2 and time.monotonic() < deadline:  # forked one by one
            time.sleep(0.01)
        print(json.dumps([server, loader.pool_pid] + loader.worker_pids), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=_env(tmp_path), cwd=tmp_path)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 4
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(SCRIPT_TIMEOUT_S)
        proc.stdout.close()
    assert exited_after(pids, GONE_S) is not None


# Python 3.14 makes forkserver multiprocessing's default on Linux; users also set it (or
# spawn) themselves.  shmfeed starts its pools its own way, so neither may change how.
MP_SCRIPT = """
import json, multiprocessing, os, sys
import numpy as np
import shmfeed

multiprocessing.set_start_method(sys.argv[1])
with open(os.environ["BODY_LOG"], "a") as f:
    f.write(f"body ran in {os.getpid()}\\n")

class Rows:                                  # defined in __main__, no guard anywhere
    def __len__(self):
        return 30
    def __getitem__(self, i):
        return np.full((2,), i, np.int32)

out = {"mp": multiprocessing.get_start_method()}
for asked in ("auto", "spawn"):
    with shmfeed.Loader(Rows(), batch_size=4, num_workers=2, start_method=asked) as loader:
        out[asked] = [loader.start_method, [int(v) for b in loader for v in b[:, 0]]]
print(json.dumps(out))
"""


@pytest.mark.parametrize("mp_method", ["forkserver", "spawn"])
def test_multiprocessings_start_method_set_by_the_user_does_not_change_shmfeeds(tmp_path, mp_method):
    script = tmp_path / "train.py"
    script.write_text(MP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), mp_method], capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S, env=_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mp"] == mp_method
    # auto forks (nothing started JAX here); spawn is shmfeed's fresh interpreter, which
    # never re-runs the unguarded __main__ as multiprocessing's spawn would.
    assert result["auto"] == ["fork", list(range(30))]
    assert result["spawn"] == ["spawn", list(range(30))]
    assert len((tmp_path / "body.log").read_text().splitlines()) == 1

"""Multi-process JAX, the whole run: several JAX processes on localhost (127.0.0.1 only,
CPU devices, JAX's gloo collectives across processes), each feeding its Loader shard
through `prefetch_to_device` into global arrays; a jitted step whose loss is a mean
over the global batch; orbax checkpoints saved by one process count and resumed on
another; one process killed with SIGKILL.

Run as a script, this file is the body of those processes:
`python tests/test_multihost.py RANK PROCS PORT DEVICES STEPS [--ckpt DIR --every N]`
(see `_main` for the other options).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from _procs import exited_after

import shmfeed

ROOT = Path(__file__).resolve().parent.parent
N_SAMPLES, GLOBAL_BATCH, FEATURES = 96, 8, 4  # 12 global batches an epoch
LR = 0.05
SEED = 3
HEARTBEAT_TIMEOUT_S = 10  # how long JAX's coordinator waits for a silent process
RUN_TIMEOUT_S = 90.0  # for a whole group of processes; a run takes 10-30 s here

STARTS_JAX = True  # the references run JAX here: after the tests that fork (conftest.py)


class Points:
    """Sample i: features that depend on i and on the sample's keyed RNG (so a batch
    read on another process count must draw the same noise), and a linear target."""

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int):
        x = np.arange(FEATURES, dtype=np.float32) * np.float32(0.1) + np.float32(i % 7 - 3)
        x = x + shmfeed.rng().normal(0, 0.5, FEATURES).astype(np.float32)
        y = np.float32(x @ np.array([0.5, -1.0, 2.0, 0.25], np.float32) + 1.0)
        return {"x": x, "y": y, "id": np.int32(i)}


def make_loader(shard_index: int, shard_count: int, num_workers: int) -> shmfeed.Loader:
    return shmfeed.Loader(Points(), batch_size=GLOBAL_BATCH // shard_count, num_workers=num_workers,
                          shuffle=True, seed=SEED, drop_last=True,
                          shard_index=shard_index, shard_count=shard_count)


def init_params():
    return {"w": np.zeros(FEATURES, np.float32), "b": np.zeros((), np.float32)}


def make_step(replicated=None):
    """One SGD step on the mean squared error over the (global) batch; returns the new
    parameters, the loss and the batch's sample ids, replicated (readable on every
    process)."""
    import jax
    import jax.numpy as jnp

    def loss_fn(params, batch):
        pred = batch["x"] @ params["w"] + params["b"]
        return jnp.mean((pred - batch["y"]) ** 2)

    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        return params, loss, batch["id"]

    if replicated is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=(replicated, replicated, replicated))


# -- the tests -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(procs: int, devices: int, steps: int, *options: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return [subprocess.Popen([sys.executable, __file__, str(r), str(procs), port, str(devices),
                              str(steps), *options], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for r in range(procs)]


def _finish(procs: list[subprocess.Popen], timeout_s: float = RUN_TIMEOUT_S) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout_s
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    return outs


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _steps(out: str) -> dict[int, dict]:
    return {r["step"]: r for r in _records(out) if "step" in r}


def _resumed(out: str) -> int | None:
    return next((r["resumed"] for r in _records(out) if "resumed" in r), None)


def _reference(steps: int) -> dict[int, dict]:
    """One process, one device, the whole global batch: the run the others must match."""
    import jax

    step_fn = make_step()
    params = jax.tree.map(np.asarray, init_params())
    out = {}
    with make_loader(0, 1, num_workers=0) as loader:
        k = 0
        while k < steps:
            for batch in loader:
                params, loss, ids = step_fn(params, batch)
                k += 1
                out[k] = {"step": k, "loss": float(loss), "ids": np.asarray(ids).tolist()}
                if k == steps:
                    break
    return out


@pytest.mark.timeout(150)
@pytest.mark.integration
def test_four_processes_train_on_the_global_batches_of_one():
    """4 JAX processes x 1 CPU device, each loading a quarter of every global batch: the
    losses of a step whose loss is a mean over the global batch are those of one process
    reading the whole batch."""
    steps = 15  # past an epoch's end (12 batches)
    outs = _finish(_start(procs=4, devices=1, steps=steps))
    for rc, out, err in outs:
        assert rc == 0, out + err
    runs = [_steps(out) for _, out, _ in outs]
    assert all(run == runs[0] for run in runs)  # losses, batches, loader states: bit for bit
    ref = _reference(steps)
    for run in runs:
        assert sorted(run) == list(range(1, steps + 1))
        _same_as_reference(run, ref)


@pytest.mark.timeout(90)
def test_two_processes_step_on_global_batches_and_refuse_shardings_that_mix_their_rows():
    """The default tier's multi-process run (2 processes x 1 CPU device, 3 steps): the
    step's global batches and losses are one process's; and a sharding under which
    two processes would hold the same rows (replicated), or a loader split into more
    shards than the processes the mesh spans, is refused before the first batch
    (JAX itself would build the array silently)."""
    outs = _finish(_start(2, 1, 3, "--refusals"))
    for rc, out, err in outs:
        assert rc == 0, out + err
    ref = _reference(3)
    for _, out, _ in outs:
        run = _steps(out)
        assert sorted(run) == [1, 2, 3]
        _same_as_reference(run, ref)
        refused = next(r["refused"] for r in _records(out) if "refused" in r)
        assert "on devices of processes 0 and 1" in refused["replicated"], refused
        assert "`shard_count=1`" in refused["replicated"], refused
        assert "from the rows of 2 processes" in refused["four_shards"], refused
        assert "host_shard()" in refused["four_shards"], refused


def _same_as_reference(run: dict[int, dict], ref: dict[int, dict]) -> None:
    for k in run:
        assert run[k]["ids"] == ref[k]["ids"], k  # the same global batches, exactly
        # float tolerance: XLA sums the mean's rows in another order across devices
        assert run[k]["loss"] == pytest.approx(ref[k]["loss"], rel=1e-6, abs=1e-7), k


@pytest.mark.timeout(150)
@pytest.mark.integration
def test_a_checkpoint_of_four_processes_resumes_on_two_with_the_same_global_batches(tmp_path):
    """Model and loader state saved with orbax by 4 processes x 1 device after 8 steps;
    2 processes x 2 devices (the same global batch size) restore it and continue, across
    the epoch's end, with the global batches and losses of an uninterrupted run."""
    ckpt = str(tmp_path / "ckpt")
    first = _finish(_start(4, 1, 8, "--ckpt", ckpt, "--every", "4"))
    for rc, out, err in first:
        assert rc == 0, out + err
    runs = [_steps(out) for _, out, _ in first]
    for k in runs[0]:  # every process holds the same position: orbax saves process 0's
        assert all(run[k]["state"] == runs[0][k]["state"] for run in runs), k
    assert runs[0][8]["state"]["next_batch"] == 8
    second = _finish(_start(2, 2, 20, "--ckpt", ckpt, "--every", "4"))
    for rc, out, err in second:
        assert rc == 0, out + err
    ref = _reference(20)
    for _, out, _ in second:
        assert _resumed(out) == 8, out
        run = _steps(out)
        assert sorted(run) == list(range(9, 21))  # 4 more of epoch 0, then 8 of epoch 1
        _same_as_reference(run, ref)


@pytest.mark.parametrize("victim", [2, 0], ids=["a_worker_process", "the_coordinator"])
@pytest.mark.timeout(150)
@pytest.mark.integration
def test_one_process_killed_fails_the_others_within_the_heartbeat_and_a_restart_resumes(
        tmp_path, victim):
    """SIGKILL of one of 4 processes mid-epoch: the others exit with JAX's error within
    the heartbeat timeout (no hang), their loaders' processes go too, and the same
    command run again resumes from the last checkpoint with the uninterrupted losses."""
    ckpt = str(tmp_path / "ckpt")
    procs = _start(4, 1, 24, "--ckpt", ckpt, "--every", "4", "--step-s", "0.2")
    watched = procs[1 if victim == 0 else 0]
    helpers: list[int] = []
    try:
        for line in watched.stdout:
            if line.startswith('{"pids"'):
                helpers += json.loads(line)["pids"]
            if line.startswith('{"step": 7,'):
                break
        for p in procs:  # each process's fork server, supervisor and worker
            helpers += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        assert len(helpers) >= 12, helpers
        killed_at = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        outs = _finish(procs, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    failed_after_s = time.monotonic() - killed_at
    assert failed_after_s < HEARTBEAT_TIMEOUT_S + 15, failed_after_s
    for rank, (rc, out, err) in enumerate(outs):
        if rank == victim:
            assert rc == -signal.SIGKILL
            continue
        assert rc != 0, out
        assert "Terminating process because the JAX distributed service detected fatal errors" in err \
            or "Gloo" in err, err[-3000:]
        assert '"step": 24' not in out
    assert exited_after(helpers, timeout_s=10.0) is not None, [
        p for p in helpers if psutil.pid_exists(p)]
    again = _finish(_start(4, 1, 24, "--ckpt", ckpt, "--every", "4"))
    ref = _reference(24)
    for rc, out, err in again:
        assert rc == 0, out + err
        resumed = _resumed(out)
        assert resumed in (4, 8), out  # saves are asynchronous: the last may not have finished
        run = _steps(out)
        assert sorted(run) == list(range(resumed + 1, 25))
        _same_as_reference(run, ref)


def _example(tmp_path: Path, *args: str) -> list[str]:
    """The command line of examples/train_flax.py, small (96 training samples, 6 global
    batches of 16 an epoch)."""
    return [sys.executable, str(ROOT / "examples" / "train_flax.py"), "--samples", "120",
            "--batch-size", "16", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            "--log-steps", *args]


def _example_losses(out: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) loss (\S+)$", out, re.M)}


@pytest.mark.timeout(300)  # three runs of the example, each starting JAX and compiling
@pytest.mark.integration
def test_the_flax_example_runs_on_two_processes_and_resumes_on_one(tmp_path):
    """The README's multi-process command, on 2 processes: the losses of one process
    reading the whole global batch; its checkpoint resumes on 1 process and continues
    with that process's losses."""
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4"]
    # All three write the dataset at once: each file lands whole, by a rename.
    opened = [subprocess.Popen(_example(tmp_path, "--epochs", "2"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)]
    opened += [subprocess.Popen(_example(tmp_path, "--epochs", "1", *ckpt, "--num-processes", "2",
                                         "--process-id", str(r), "--coordinator", f"127.0.0.1:{port}"),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for r in range(2)]
    (rc, whole, err), *two = _finish(opened, timeout_s=2 * RUN_TIMEOUT_S)
    assert rc == 0, whole + err
    for rc, out, err in two:
        assert rc == 0, out + err
    reference, first = _example_losses(whole), _example_losses(two[0][1])
    assert sorted(reference) == list(range(1, 13)) and sorted(first) == list(range(1, 7))
    assert two[1][1].count("step ") == 0  # process 1 leaves the talking to process 0
    for k, loss in first.items():
        assert loss == pytest.approx(reference[k], rel=1e-5), k
    again = subprocess.run(_example(tmp_path, "--epochs", "2", *ckpt), env=env, capture_output=True,
                           text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed at step 4: epoch 1, batch 4" in again.stdout, again.stdout
    resumed = _example_losses(again.stdout)
    assert sorted(resumed) == list(range(5, 13))
    for k, loss in resumed.items():
        assert loss == pytest.approx(reference[k], rel=1e-5), k


# -- the processes ---------------------------------------------------------------------------
def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    for name in ("rank", "procs", "port", "devices", "steps"):
        p.add_argument(name, type=int)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--step-s", type=float, default=0.0, help="sleep after each step")
    p.add_argument("--refusals", action="store_true", help="try shardings that must be refused")
    a = p.parse_args(argv)

    import jax

    jax.distributed.initialize(f"127.0.0.1:{a.port}", num_processes=a.procs, process_id=a.rank,
                               coordinator_bind_address=f"127.0.0.1:{a.port}",
                               initialization_timeout=60,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    import shmfeed.jax as sj

    index, count = sj.host_shard()
    # The loader before JAX's backend starts: its workers fork from a clean process.
    loader = make_loader(index, count, num_workers=1)
    print(json.dumps({"pids": [c.pid for c in psutil.Process().children(recursive=True)]}),
          flush=True)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    with loader:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        assert mesh.devices.size == a.procs * a.devices
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        if a.refusals:
            refused = {}
            with make_loader(index, count, num_workers=0) as same, \
                    shmfeed.Loader(Points(), batch_size=1, num_workers=0, drop_last=True,
                                   shard_index=index, shard_count=4) as four:
                for name, source, sharding in (("replicated", same, replicated),
                                               ("four_shards", four, rows)):
                    try:
                        sj.prefetch_to_device(source, sharding=sharding)
                    except shmfeed.SpecError as exc:
                        refused[name] = str(exc)
            print(json.dumps({"refused": refused}), flush=True)
        step_fn = make_step(replicated)
        params = jax.device_put(init_params(), replicated)
        k, ckpt = 0, None
        if a.ckpt is not None:
            import orbax.checkpoint as ocp

            ckpt = ocp.CheckpointManager(a.ckpt)
            if ckpt.latest_step() is not None:
                k = ckpt.latest_step()
                restored = ckpt.restore(k, args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(params), loader=ocp.args.JsonRestore()))
                params = restored.model
                loader.load_state_dict(restored.loader)
                print(json.dumps({"resumed": k, "loader": restored.loader}), flush=True)
        while k < a.steps:
            for batch in sj.prefetch_to_device(loader, size=2, sharding=rows):
                params, loss, ids = step_fn(params, batch)
                k += 1
                state = loader.state_dict()
                print(json.dumps({"step": k, "loss": float(loss), "ids": np.asarray(ids).tolist(),
                                  "state": state}), flush=True)
                if ckpt is not None and k % a.every == 0:
                    # orbax writes the JSON of process 0 only: every process must hold
                    # the same position (the state counts global batches).
                    digest = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
                    multihost_utils.assert_equal(digest, "the loader states differ")
                    ckpt.save(k, args=ocp.args.Composite(model=ocp.args.StandardSave(params),
                                                         loader=ocp.args.JsonSave(state)))
                time.sleep(a.step_s)
                if k == a.steps:
                    break
        if ckpt is not None:
            ckpt.wait_until_finished()
            ckpt.close()
    jax.distributed.shutdown()


if __name__ == "__main__":
    _main(sys.argv[1:])

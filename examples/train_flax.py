"""Train a small 3-D CNN with Flax and optax, fed by shmfeed.

The data is laid out the way the classic Keras data-generator tutorial does it: one
`.npy` file per sample ID, a `partition` dict of IDs (train / validation) and a
`labels` dict (ID -> class).  Here it is synthetic but learnable: a 32x32x32 volume
holds a blurred blob near one of the 6 faces of the cube, and the class is which face.

    python examples/train_flax.py                       # ~3000 samples, 5 epochs
    python examples/train_flax.py --samples 480 --epochs 3 --workers 1

Loaders are created before JAX runs anything, so their workers are forked (creating
one later also works: the workers then start from a fresh interpreter).  With more
than one local device, each batch is split over them along the batch axis.

Checkpoints: with `--checkpoint-dir`, every `--checkpoint-every` steps the model, the
optimiser and the training loader's state (`loader.state_dict()`, a few integers) are
saved together with orbax-checkpoint; started again with the same arguments after a
crash (even `kill -9` in the middle of an epoch), the script restores all three and
continues with exactly the batch after the last one of the checkpoint, so its losses
are those of a run that was never interrupted.

    python examples/train_flax.py --checkpoint-dir /tmp/ckpt --checkpoint-every 50

Several JAX processes (hosts; here 4 on one machine, on CPU): the same command in each,
with its `--process-id`.  Each process loads its own part of every global batch
(`shmfeed.jax.host_shard()`), `--batch-size` stays the global batch size, and the step
sees global arrays over a mesh of every process's devices.  A checkpoint written by N
processes resumes on any number that divides the global batch size.

    for i in 0 1 2 3; do
      JAX_PLATFORMS=cpu python examples/train_flax.py --num-processes 4 --process-id $i \
          --coordinator 127.0.0.1:12355 --checkpoint-dir /tmp/ckpt &
    done; wait
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

import shmfeed

SIDE = 32  # voxels per side of a volume
N_CLASSES = 6  # one per face of the cube


# -- the dataset on disk -----------------------------------------------------------------
def write_dataset(data_dir: Path, n_samples: int, seed: int) -> tuple[dict, dict]:
    """Write `n_samples` volumes as data_dir/<id>.npy (uint8) and return (partition,
    labels); reuse what is there when it was written with the same arguments.  Every
    file is written whole under a temporary name, then renamed: processes that write
    the same (deterministic) dataset at once never read a half-written file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    index_file = data_dir / "index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        if index.get("n_samples") == n_samples and index.get("seed") == seed:
            return index["partition"], index["labels"]
    rng = np.random.default_rng(seed)
    axis = np.arange(SIDE, dtype=np.float32)
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    faces = np.array([[0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0]], np.float32)
    labels = {}
    for k in range(n_samples):
        sid = f"id-{k}"
        label = int(rng.integers(N_CLASSES))
        centre = SIDE / 2 + faces[label] * SIDE / 4 + rng.normal(0, 2.0, size=3)
        sigma = rng.uniform(2.5, 4.0)
        d2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
        vol = np.exp(-d2 / (2 * sigma**2)) + rng.normal(0.2, 0.15, size=d2.shape)
        data = np.clip(vol * 200, 0, 255).astype(np.uint8)
        with _written(data_dir / f"{sid}.npy") as f:
            np.save(f, data)
        labels[sid] = label
    ids = list(labels)
    n_val = max(n_samples // 5, 1)
    partition = {"train": ids[n_val:], "validation": ids[:n_val]}
    index = {"n_samples": n_samples, "seed": seed, "partition": partition, "labels": labels}
    with _written(index_file) as f:
        f.write(json.dumps(index).encode())
    return partition, labels


@contextlib.contextmanager
def _written(path: Path):
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, path)


class VolumeDataset:
    """Sample i: the volume of ID `ids[i]` as float32 (side, side, side, 1), and its label."""

    def __init__(self, data_dir: Path, ids: list[str], labels: dict[str, int], augment: bool):
        self.data_dir, self.ids, self.labels, self.augment = data_dir, ids, labels, augment

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        sid = self.ids[i]
        vol = np.load(self.data_dir / f"{sid}.npy").astype(np.float32) * (1 / 255)
        if self.augment:  # brightness jitter, from the sample's own deterministic RNG
            vol *= np.float32(shmfeed.rng().uniform(0.8, 1.2))
        return {"volume": vol[..., None], "label": np.int32(self.labels[sid])}


# -- training ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=3000, help="samples written to disk")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="global: over all processes")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path("train_flax_data"))
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save model, optimiser and loader state here, and resume from it")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-steps", action="store_true", help="print every step's loss")
    p.add_argument("--num-processes", type=int, default=1, help="JAX processes in the run")
    p.add_argument("--process-id", type=int, default=0, help="this process: 0 .. num-processes - 1")
    p.add_argument("--coordinator", default="127.0.0.1:12355",
                   help="host:port of process 0, where JAX's coordinator listens")
    p.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which the others give up on a process that died")
    args = p.parse_args(argv)

    index, count = 0, 1
    if args.num_processes > 1:
        import jax

        # Before any JAX computation, and before the loaders: it does not start JAX's
        # backend, so their workers still fork from a clean process.
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   # listen where the others connect, not on every interface
                                   coordinator_bind_address=args.coordinator,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
        from shmfeed.jax import host_shard

        index, count = host_shard()
    if args.batch_size % count:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the "
                         f"{count} processes: each loads batch_size / processes rows")

    t0 = time.perf_counter()
    partition, labels = write_dataset(args.data_dir, args.samples, args.seed)
    log = print if index == 0 else (lambda *a, **k: None)  # the processes agree: one speaks
    log(f"dataset: {len(partition['train'])} train / {len(partition['validation'])} validation "
        f"volumes of {SIDE}^3 in {args.data_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)

    # Loaders first: their workers fork before JAX starts any thread.  Each process
    # reads its own rows of every global batch.
    shard = dict(batch_size=args.batch_size // count, shard_index=index, shard_count=count)
    train = shmfeed.Loader(VolumeDataset(args.data_dir, partition["train"], labels, augment=True),
                           num_workers=args.workers, shuffle=True, seed=args.seed, drop_last=True,
                           **shard)
    val = shmfeed.Loader(VolumeDataset(args.data_dir, partition["validation"], labels, augment=False),
                         num_workers=1, drop_last=True, **shard)
    with train, val:
        run(args, train, val, log)


def run(args: argparse.Namespace, train: shmfeed.Loader, val: shmfeed.Loader, log) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shmfeed.jax

    def patches(x, p):
        """(b, d, h, w, c) -> (b, d/p, h/p, w/p, p*p*p*c): non-overlapping p^3 cubes."""
        b, d, h, w, c = x.shape
        x = x.reshape(b, d // p, p, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, d // p, h // p, w // p, p * p * p * c)

    class CNN(nn.Module):
        """Two strided 3-D convolutions with kernel = stride, written as patches + Dense:
        the same maths as nn.Conv(k, (p, p, p), strides=p), but XLA:CPU trains it ~25x
        faster than its generic 3-D convolution."""

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16)(patches(x, 4)))  # 8^3 x 16
            x = nn.relu(nn.Dense(32)(patches(x, 2)))  # 4^3 x 32
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
            return nn.Dense(N_CLASSES)(x)

    devices = jax.devices()  # with several processes: every process's devices
    sharding = replicated = None
    if len(devices) > 1 and args.batch_size // jax.process_count() % jax.local_device_count() == 0:
        mesh = Mesh(np.array(devices), ("data",))
        sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    elif jax.process_count() > 1:
        raise SystemExit(f"--batch-size {args.batch_size} / {jax.process_count()} processes must "
                         f"be divisible by the {jax.local_device_count()} devices of each")
    log(f"devices: {len(devices)} x {devices[0].device_kind} in {jax.process_count()} "
        f"process(es){', batches split over them' if sharding else ''}", flush=True)

    model = CNN()
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, SIDE, SIDE, SIDE, 1)))
    tx = optax.adam(args.lr)
    opt_state = tx.init(params)
    if replicated is not None:  # the same values on every device of the mesh
        params, opt_state = jax.device_put((params, opt_state), replicated)

    def loss_and_hits(params, batch):
        logits = model.apply(params, batch["volume"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (jnp.argmax(logits, -1) == batch["label"]).sum()

    @jax.jit
    def train_step(params, opt_state, batch):
        (loss, hits), grads = jax.value_and_grad(loss_and_hits, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, hits

    eval_step = jax.jit(loss_and_hits)

    ckpt, step = None, 0
    if args.checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        ckpt = ocp.CheckpointManager(args.checkpoint_dir.absolute(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2))
        if ckpt.latest_step() is not None:
            step = ckpt.latest_step()
            restored = ckpt.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
                loader=ocp.args.JsonRestore()))
            params, opt_state = restored.model["params"], restored.model["opt_state"]
            train.load_state_dict(restored.loader)  # continues after the saved batch
            log(f"resumed at step {step}: epoch {train.epoch + 1}, batch "
                f"{restored.loader['next_batch']}", flush=True)

    while train.epoch < args.epochs:
        epoch = train.epoch + 1
        t0 = time.perf_counter()
        losses, hits, seen = [], [], 0
        for batch in shmfeed.jax.prefetch_to_device(train, size=2, sharding=sharding):
            params, opt_state, loss, h = train_step(params, opt_state, batch)
            step += 1
            losses.append(loss)  # device scalars: no sync inside the loop
            hits.append(h)
            seen += batch["label"].shape[0]
            if args.log_steps:
                log(f"step {step} loss {float(loss)!r}", flush=True)
            if ckpt is not None and step % args.checkpoint_every == 0:
                # The loader's state names the batch this step used: the feed's
                # read-ahead is not counted.  It counts global batches, so every
                # process holds the same one (orbax writes process 0's).
                state = train.state_dict()
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.assert_equal(
                        np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8),
                        "the processes' loader states differ")
                ckpt.save(step, args=ocp.args.Composite(
                    model=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                    loader=ocp.args.JsonSave(state)))
        if not losses:  # resumed after an epoch's last batch
            continue
        loss = float(jnp.mean(jnp.stack(losses)))
        acc = float(jnp.sum(jnp.stack(hits))) / seen
        dt = time.perf_counter() - t0
        val_hits, val_seen = [], 0
        for batch in shmfeed.jax.prefetch_to_device(val, size=2, sharding=sharding):
            val_hits.append(eval_step(params, batch)[1])
            val_seen += batch["label"].shape[0]
        val_acc = float(jnp.sum(jnp.stack(val_hits))) / val_seen
        log(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  accuracy {acc:.3f}  "
            f"val_accuracy {val_acc:.3f}  examples/s {seen / dt:.0f}  "
            f"input wait {train.stats().input_wait_fraction:.0%}", flush=True)
    if ckpt is not None:
        ckpt.wait_until_finished()
        ckpt.close()


if __name__ == "__main__":
    main()

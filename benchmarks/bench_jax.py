"""Step rate of a jitted training step fed by shmfeed vs the same step on batches
already in device memory (CPU), and, with --device, the GPU measurements of
shmfeed.jax._bench (H2D bandwidth, overlap).

    python benchmarks/bench_jax.py                 # CPU: resident vs fed, medians of 15 repeats
    python benchmarks/bench_jax.py --device 60     # GPU figures (skipped without a GPU)

Method (CPU): the loader (created before JAX starts, so its workers fork) reads
cheap samples (a copy of a 32^3 float32 volume each); the step is the Flax example's
model on a 64-sample batch, widened until it costs several times what loading a
batch does.  Each repeat runs one epoch in each mode, in turn (order alternating
between repeats), so that drift on a shared machine hits all modes alike:
"resident" cycles through batches placed on the device beforehand; "fed" is
`prefetch_to_device` with its default transfer.  Reported: median steps/s of each
mode, the median over repeats of fed/resident within the repeat, the ratio of the
medians, and the cost of loading alone.  --zero-copy adds `transfer="xla"` (XLA:CPU aliases the ring), which
needs a slot per step that async dispatch may queue, so the ring gets `steps + 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import shmfeed

SIDE = 32
BANK = 16  # distinct volumes the source copies from


class Volumes:
    """Sample i: a float32 (32, 32, 32, 1) volume (a copy from a small bank) and a label."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.n = n
        self.bank = rng.random((BANK, SIDE, SIDE, SIDE, 1), dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"volume": self.bank[i % BANK], "label": np.int32(i % 6)}


def build_step(width: int):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    def patches(x, p):
        b, d, h, w, c = x.shape
        x = x.reshape(b, d // p, p, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, d // p, h // p, w // p, p * p * p * c)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(width)(patches(x, 4)))
            x = nn.relu(nn.Dense(2 * width)(patches(x, 2)))
            x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
            return nn.Dense(6)(x)

    model, tx = Net(), optax.adam(1e-3)
    params = model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, SIDE, 1)))
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = model.apply(p, batch["volume"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @jax.jit
    def step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return step, params, opt_state


def cpu_benchmark(args: argparse.Namespace) -> dict:
    n_samples = args.steps * args.batch_size
    # Zero copy needs a slot for every step async dispatch may queue: one per step.
    slots = args.steps + 4 if args.zero_copy else None
    loader = shmfeed.Loader(Volumes(n_samples), batch_size=args.batch_size, num_workers=args.workers,
                            shuffle=True, drop_last=True, num_slots=slots)  # forks: JAX not started
    import jax

    import shmfeed.jax as sj

    with loader:
        step, params, opt_state = build_step(args.width)
        resident = [jax.device_put({k: np.array(v) for k, v in b.items()})
                    for _, b in zip(range(8), loader)]
        state = [params, opt_state]

        def run_resident() -> float:
            p, s = state
            t0 = time.perf_counter()
            for i in range(args.steps):
                p, s, loss = step(p, s, resident[i % len(resident)])
            loss.block_until_ready()
            state[:] = [p, s]
            return args.steps / (time.perf_counter() - t0)

        def run_fed(transfer: str) -> float:
            p, s = state
            t0 = time.perf_counter()
            n = 0
            for batch in sj.prefetch_to_device(loader, size=2, transfer=transfer):
                p, s, loss = step(p, s, batch)
                n += 1
            loss.block_until_ready()
            state[:] = [p, s]
            return n / (time.perf_counter() - t0)

        def run_load_only() -> float:
            t0 = time.perf_counter()
            n = sum(1 for _ in loader)
            return (time.perf_counter() - t0) / n

        def step_ms() -> float:
            p, s = state
            batch = resident[0]
            p, s, loss = step(p, s, batch)
            loss.block_until_ready()
            t0 = time.perf_counter()
            for _ in range(10):
                p, s, loss = step(p, s, batch)
            loss.block_until_ready()
            return (time.perf_counter() - t0) / 10 * 1e3

        modes = {"resident": run_resident, "fed": lambda: run_fed("copy")}
        if args.zero_copy:
            modes["fed_zero_copy"] = lambda: run_fed("xla")
        for run in modes.values():  # warm-up: compile, fault pages in, start the pool
            run()
        rates: dict[str, list[float]] = {m: [] for m in modes}
        names = list(modes)
        for r in range(args.repeats):
            # Alternate the order so that a trend in the machine's load favours no mode.
            for name in (names if r % 2 == 0 else names[::-1]):
                rates[name].append(modes[name]())
        load_s = statistics.median(run_load_only() for _ in range(3))
        med = {m: statistics.median(v) for m, v in rates.items()}
        # Each repeat's fed run against the resident run of the same repeat: on a shared
        # machine, the median of these paired ratios is steadier than a ratio of medians.
        paired = {m: round(statistics.median(f / r for f, r in zip(rates[m], rates["resident"])), 3)
                  for m in names if m != "resident"}
        return {
            "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device, "
                      f"{os.cpu_count()} cores: {platform.processor() or platform.machine()})",
            "jax": jax.__version__,
            "batch": f"{args.batch_size} x {SIDE}^3 x 1 float32 ({args.batch_size * SIDE**3 * 4 / 2**20:.0f} MiB)",
            "workers": args.workers,
            "step_ms_resident": round(step_ms(), 2),
            "load_ms_per_batch_alone": round(load_s * 1e3, 2),
            "steps_per_s_median": {m: round(v, 2) for m, v in med.items()},
            "steps_per_s_all": {m: [round(x, 2) for x in v] for m, v in rates.items()},
            "fed_over_resident_paired_median": paired,
            "fed_over_resident_of_medians": {m: round(med[m] / med["resident"], 3) for m in paired},
            "load_average_1_5_15_min": list(os.getloadavg()),
            "ring_slots": loader.num_slots,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16, help="steps per repeat (one epoch)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--width", type=int, default=64, help="model width: sets the step's cost")
    p.add_argument("--zero-copy", action="store_true",
                   help="also measure transfer='xla' (XLA:CPU aliases the ring), with a slot per step")
    p.add_argument("--device", type=float, metavar="SECONDS", default=None,
                   help="run the GPU benchmark for about SECONDS instead")
    args = p.parse_args()
    command = " ".join(["python", *sys.argv])
    if args.device is not None:
        from shmfeed.jax._bench import run_device_benchmark

        result = run_device_benchmark(args.device)
    else:
        result = cpu_benchmark(args)
    result["command"] = command
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

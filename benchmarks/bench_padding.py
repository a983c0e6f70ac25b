"""Variable-length tokens: everything padded to 512 vs length bucketing.

    python benchmarks/bench_padding.py                         # loader only, 3 s per mode
    python benchmarks/bench_padding.py --step-ns-per-token 20  # + a step whose cost scales with the padded batch
    python benchmarks/bench_padding.py --json out.json

Workload: sample i is `{"tokens": int32[L_i], "label": i}` with L_i in 1..512,
long-tailed (L = 1 + 511 u^4 for a hashed u in [0, 1): mean ~103, median ~32), sliced
from an in-memory array (no per-sample computation).  Modes, each with `--workers`
workers, `--batch-size` samples, shuffled, `with_lengths=True`:

- padded:   `padded_shapes={"tokens": (512,)}`;
- bucketed: `padded_shapes={"tokens": (None,)}`, `bucket_boundaries=[64, 128, 256, 512]`,
  lengths from a function of the index.

Measured from the first batch, for `--seconds`, modes interleaved over `--repeat`
rounds (medians): real tokens/s delivered, padded tokens/s (what a step computes
on), the padding fraction (1 - real / padded), batches/s.  With
`--step-ns-per-token`, the loop sleeps that long per padded token after each batch,
as a model whose step cost is proportional to the padded batch would; tokens/s then
shows what bucketing saves end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import shmfeed

MAX_LEN = 512
BOUNDARIES = [64, 128, 256, MAX_LEN]
N_SAMPLES = 1 << 17


def length(i: int) -> int:
    u = (i * 2654435761 % 2**32) / 2**32
    return 1 + int((MAX_LEN - 1) * u**4)


class VarTokens:
    def __init__(self, n: int):
        self.n = n
        self.bank = np.arange(MAX_LEN * 4, dtype=np.int32)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = i % (3 * MAX_LEN)
        return {"tokens": self.bank[start : start + length(i)], "label": i}


def run(mode: str, args: argparse.Namespace) -> dict:
    if mode == "padded":
        opts = dict(padded_shapes={"tokens": (MAX_LEN,)})
    else:
        opts = dict(padded_shapes={"tokens": (None,)}, bucket_boundaries=BOUNDARIES, bucket_lengths=length)
    t_build = time.perf_counter()
    with shmfeed.Loader(VarTokens(N_SAMPLES), batch_size=args.batch_size, num_workers=args.workers,
                        shuffle=True, seed=0, drop_last=True, with_lengths=True, **opts) as loader:
        it = iter(loader)
        first = next(it)
        startup_s = time.perf_counter() - t_build
        del first
        real = padded = batches = 0
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        for batch in it:
            n = int(batch["lengths"]["tokens"].sum())
            size = batch["tokens"].size
            real += n
            padded += size
            batches += 1
            if args.step_ns_per_token:
                time.sleep(size * args.step_ns_per_token * 1e-9)
            del batch
            if time.perf_counter() > deadline:
                break
        dt = time.perf_counter() - t0
    return {"mode": mode, "startup_s": startup_s, "batches_per_s": batches / dt, "tokens_per_s": real / dt,
            "padded_tokens_per_s": padded / dt, "padding_fraction": 1 - real / padded}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--step-ns-per-token", type=float, default=0.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results: dict[str, list[dict]] = {"padded": [], "bucketed": []}
    for r in range(args.repeat):
        for mode in (("padded", "bucketed") if r % 2 == 0 else ("bucketed", "padded")):
            results[mode].append(run(mode, args))
    print(f"{args.workers} workers, batch {args.batch_size}, {args.seconds:g} s x {args.repeat}, "
          f"step {args.step_ns_per_token:g} ns/padded token")
    print(f"{'mode':<9} {'startup s':>9} {'batches/s':>10} {'tokens/s':>12} {'padded tok/s':>13} {'padding':>8}")
    summary = {}
    for mode, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "mode"}
        summary[mode] = med
        print(f"{mode:<9} {med['startup_s']:>9.2f} {med['batches_per_s']:>10.0f} {med['tokens_per_s']:>12,.0f} "
              f"{med['padded_tokens_per_s']:>13,.0f} {med['padding_fraction']:>8.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "median": summary}, f, indent=1)


if __name__ == "__main__":
    main()

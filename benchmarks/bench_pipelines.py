"""Pipeline sources against the plain source on the same data (issue 28).

    python benchmarks/bench_pipelines.py                     # 3 s per mode, 3 rounds
    python benchmarks/bench_pipelines.py --seconds 1 --repeat 1 --json out.json

Workload: `--docs` documents with log-normal lengths (sigma 1, mean 300 tokens, clipped
to [1, 2048]) in one flat int32 token array.  Modes, each `--workers` workers,
`--batch-size` rows of 2048 tokens:

- windows: `Windows(tokens, 2048)`, shuffled by the Loader (the baseline: gathered in C);
- packed:  `Packed(tokens, 2048, boundaries=...)` (documents whole, best-fit decreasing
  per window of 1024, segment ids and positions), Loader `shuffle=False`;
- mix:     `Mix([packed, packed'], [0.7, 0.3])`;
- sampled: `Sampled(Windows(...), weights)` with log-normal weights;
- windows+transform: `Windows` with a `batch_transform` that casts to int64;
- token-budget: each document a sample `{"tokens": int32[L]}`, length buckets
  `[256, 512, 1024, 2048]` with `token_budget=--batch-size * 2048` (bucket k's batches
  `T // boundary_k` rows: 8 rows of 2048 tokens or 64 of 256 at the default);
- padded-max: the same samples, every row padded to 2048, `--batch-size` rows (the
  baseline for token-budget: the same tokens per batch).

Modes interleaved over `--repeat` rounds; per mode the medians of batches/s, real
(non-padding) tokens/s, the padding fraction of the delivered batches (1 - real /
delivered tokens) and the training loop's CPU per batch (process CPU time over the
measured window divided by batches: what the loop pays to take a batch).  Packed's
non-padding fraction and construction time are printed once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import shmfeed
from shmfeed.sources import Mix, Packed, Sampled, Windows

LENGTH = 2048
BUCKETS = [256, 512, 1024, LENGTH]


def corpus(n_docs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    lengths = np.clip(r.lognormal(np.log(300) - 0.5, 1.0, n_docs), 1, LENGTH).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    tokens = r.integers(1, 32_000, bounds[-1]).astype(np.int32)
    return tokens, bounds


class Documents:
    """Document i of the corpus as a sample `{"tokens": int32[L_i]}` (a view)."""

    def __init__(self, tokens: np.ndarray, bounds: np.ndarray):
        self.tokens, self.bounds = tokens, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[self.bounds[i] : self.bounds[i + 1]]}


def to_int64(batch):
    return batch.astype(np.int64)


def make(mode: str, tokens: np.ndarray, bounds: np.ndarray, batch_size: int = 8) -> tuple[object, dict]:
    if mode == "windows":
        return Windows(tokens, LENGTH), dict(shuffle=True)
    if mode == "windows+transform":
        return Windows(tokens, LENGTH), dict(shuffle=True, batch_transform=to_int64)
    if mode == "packed":
        return Packed(tokens, LENGTH, boundaries=bounds), {}
    if mode == "mix":
        return Mix([Packed(tokens, LENGTH, boundaries=bounds), Packed(tokens, LENGTH, boundaries=bounds, seed=1)],
                   [0.7, 0.3]), {}
    if mode == "sampled":
        w = Windows(tokens, LENGTH)
        return Sampled(w, np.random.default_rng(2).lognormal(0, 1, len(w))), {}
    if mode == "token-budget":
        return Documents(tokens, bounds), dict(
            shuffle=True, batch_size=None, token_budget=batch_size * LENGTH, padded_shapes={"tokens": (None,)},
            bucket_boundaries=BUCKETS, bucket_lengths=np.diff(bounds), with_lengths=True)
    if mode == "padded-max":
        return Documents(tokens, bounds), dict(shuffle=True, padded_shapes={"tokens": (LENGTH,)}, with_lengths=True)
    raise ValueError(mode)


def run(mode: str, tokens: np.ndarray, bounds: np.ndarray, args: argparse.Namespace) -> dict:
    source, opts = make(mode, tokens, bounds, args.batch_size)
    opts = {"batch_size": args.batch_size, **opts}
    with shmfeed.Loader(source, num_workers=args.workers, seed=0, drop_last=True, **opts) as loader:
        it = iter(loader)
        next(it)
        batches = real = delivered = 0
        t0, c0 = time.perf_counter(), time.process_time()
        deadline = t0 + args.seconds
        for batch in it:
            batches += 1
            if not isinstance(batch, dict):
                real += batch.size
                delivered += batch.size
            elif "lengths" in batch:
                real += int(batch["lengths"]["tokens"].sum())
                delivered += batch["tokens"].size
            else:
                real += int(np.count_nonzero(batch["segment_ids"]))
                delivered += batch["tokens"].size
            if time.perf_counter() >= deadline:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"batches_per_s": batches / wall, "real_tokens_per_s": real / wall,
            "padding_fraction": 1 - real / max(delivered, 1),
            "loop_cpu_us_per_batch": cpu / max(batches, 1) * 1e6, "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="windows,packed,mix,sampled,windows+transform,token-budget,padded-max")
    ap.add_argument("--json")
    args = ap.parse_args()
    tokens, bounds = corpus(args.docs)
    t = time.perf_counter()
    packed = Packed(tokens, LENGTH, boundaries=bounds)
    print(f"{args.docs} documents, {len(tokens)} tokens: Packed built in {time.perf_counter() - t:.2f} s, "
          f"{len(packed)} rows, {packed.fill:.2%} non-padding tokens")
    modes = args.modes.split(",")
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for m in modes:
            rounds[m].append(run(m, tokens, bounds, args))
    out = {"fill": packed.fill, "modes": {}}
    print(f"{'mode':<20}{'batches/s':>12}{'real tok/s':>14}{'padding':>10}{'loop CPU us/batch':>20}")
    for m in modes:
        med = {k: statistics.median(r[k] for r in rounds[m]) for k in rounds[m][0]}
        out["modes"][m] = med
        print(f"{m:<20}{med['batches_per_s']:>12.1f}{med['real_tokens_per_s']:>14.3g}"
              f"{med['padding_fraction']:>10.1%}{med['loop_cpu_us_per_batch']:>20.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

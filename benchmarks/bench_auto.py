"""`num_workers="auto"`/`num_slots="auto"` against every fixed choice (issue 31): for each
`shmfeed bench` workload (or `--workloads`), shmfeed with auto, with each of
`num_workers` {1, 2, 3} x `num_slots` {4, 8, 16}, and with today's default (what
`shmfeed bench` runs without --workers/--slots: the usable CPUs, at most 8, and the
default ring), `--rounds` rounds alternating the configurations (shuffled each round),
each measurement in a fresh child interpreter by `shmfeed bench`'s own runner
(`runner.run_child`: the same timing, epochs and touch of every batch).

    python benchmarks/bench_auto.py [--workloads transport,arrays-tokens] [--rounds 5] [--seconds 3]
                                    [--epoch-batches 200] [--json out.json]

Prints per workload the median batches/s of each configuration, auto / the best
fixed one (goal: >= 0.9) and auto / today's default (goal: >= 1.0), both also as the
median of each round's ratio (the machine's drift between rounds cancels), and what auto
did: per round (on stderr) and for its last round, `stats().auto`, with the epochs
its run saw.  Numbers mean something only on a quiet machine: run it alone.

The tuner changes the worker count only between epochs, after at least
`_autotune.MIN_WINDOW_S` of them: a run that ends inside its first epoch measures
auto's start (the default's configuration) and nothing of the tuner.  At the
default lengths, the per-sample workloads' epochs are 16,384 batches (minutes at
tens to hundreds of batches/s); `windows` is 3,051 batches, `arrays-tokens` and
`stream-shards` 2,048, `arrays-images` and `disk-images` 32.  So each workload's
line says how many epochs auto's runs started, and `--epoch-batches N` makes the
epochs of the workloads whose length is free (per-sample and batch-level) N
batches long, for runs that are long enough (`--seconds`) to reach several.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from shmfeed import _sysinfo
from shmfeed._cli.bench import workloads
from shmfeed._cli.bench.loaders import Job
from shmfeed._cli.bench.runner import BenchOptions, check_fits, describe_batch, run_child
from shmfeed._cli.main import DEFAULT_WORKERS_MAX

FIXED_WORKERS = (1, 2, 3)
FIXED_SLOTS = (4, 8, 16)
AUTO = "auto"
DEFAULT = "default"


def configs() -> dict[str, tuple[int | str, int | str | None]]:
    """Name -> (num_workers, num_slots) of every configuration measured."""
    out: dict[str, tuple[int | str, int | str | None]] = {AUTO: ("auto", "auto")}
    out.update({f"w{w}-s{s}": (w, s) for w in FIXED_WORKERS for s in FIXED_SLOTS})
    out[DEFAULT] = (min(_sysinfo.usable_cpus().value, DEFAULT_WORKERS_MAX), None)
    return out


def prepare(name: str, data_dir: Path, data_rows: int | None) -> tuple[str, int]:
    """The workload's data file (made once, cached like `shmfeed bench`'s) and batch size."""
    workload = workloads.WORKLOADS[name]
    path, _ = workloads.ensure_file(workload.data, data_dir, data_rows)
    if not workload.cold:
        workloads.warm_page_cache(path)
    return str(path), workload.batch_size


def measure(name: str, path: str, batch_size: int, workers, slots, seconds: float,
            length: int | None) -> dict:
    job = Job(workload=name, loader="shmfeed", data_path=path, length=length, batch_size=batch_size,
              workers=workers, slots=slots, shuffle=False, seed=0, seconds=seconds)
    return run_child(job, lambda waited: None)


def epoch_length(name: str, length: int | None, epoch_batches: int | None) -> int | None:
    """The `length` (samples, or batches for a batch-level source) that gives `name`'s
    epochs `epoch_batches` batches, where its length is free; else `length`."""
    workload = workloads.WORKLOADS[name]
    if epoch_batches is None or workload.stream or workload.arrays:
        return length
    return epoch_batches if workload.batch_level else epoch_batches * workload.batch_size


def batches_per_epoch(workload: workloads.Workload, source, batch_size: int) -> int | None:
    """What one epoch of `source` is in batches (None for a stream: known once read)."""
    if workload.stream:
        return None
    n = len(source)
    # The array workloads run with drop_last (shmfeed_ring.py); the others keep a short last batch.
    return n if workload.batch_level else (n // batch_size if workload.arrays else -(-n // batch_size))


def run_workload(name: str, rounds: int, seconds: float, data_dir: Path, data_rows: int | None,
                 length: int | None, seed: int) -> dict:
    path, batch_size = prepare(name, data_dir, data_rows)
    workload = workloads.WORKLOADS[name]
    source = workloads.make_source(workload, path, batch_size=batch_size, length=length, seed=0)
    batch_bytes, _ = describe_batch(workload, source, batch_size)
    epoch_batches = batches_per_epoch(workload, source, batch_size)
    del source
    cfgs = configs()
    most = max(w for w, _ in cfgs.values() if isinstance(w, int))
    check_fits(name, batch_size, batch_bytes, BenchOptions(workloads=[name], peers=[], workers=most))
    errors: dict[str, list[str]] = {c: [] for c in cfgs}
    auto_said = ""
    auto_rounds: list[dict] = []  # per round: what auto said, and the epochs its run saw
    round_rates: list[dict[str, float]] = []  # per round: each configuration's batches/s
    for r in range(rounds):
        round_rates.append({})
        order = list(cfgs)
        random.Random(seed * 1000 + r).shuffle(order)
        for c in order:
            workers, slots = cfgs[c]
            result = measure(name, path, batch_size, workers, slots, seconds, length)
            if result.get("status") != "ok":
                errors[c].append(str(result.get("reason")))
                print(f"  {name} round {r + 1} {c}: {result.get('status')}: {result.get('reason')}",
                      file=sys.stderr)
                continue
            round_rates[-1][c] = result["batches_per_s"]
            print(f"  {name} round {r + 1}/{rounds} {c}: {result['batches_per_s']:,.1f} batches/s",
                  file=sys.stderr)
            if c == AUTO:
                st = result.get("loader_stats", {})
                auto_said = st.get("auto", "")
                auto_rounds.append({"said": auto_said, "batches": result["batches"],
                                    "epochs_started": result["epochs_started"],
                                    "num_workers_end": st.get("num_workers"),
                                    "decisions": st.get("auto_decisions", [])})
                print(f"    auto: {result['batches']:,} batches, {result['epochs_started']} epoch(s) started; "
                      f"{auto_said}", file=sys.stderr)
    rates = {c: [rr[c] for rr in round_rates if c in rr] for c in cfgs}
    medians = {c: statistics.median(v) for c, v in rates.items() if v}
    fixed = {c: m for c, m in medians.items() if c not in (AUTO, DEFAULT)}
    best = max(fixed, key=fixed.__getitem__) if fixed else None
    auto = medians.get(AUTO)

    def paired(other: str | None) -> float | None:
        """The median over rounds of auto's batches/s over `other`'s in the same round:
        the machine's drift from round to round (often more than the difference sought)
        cancels, which a ratio of medians over all rounds keeps."""
        ratios = [rr[AUTO] / rr[other] for rr in round_rates if other and AUTO in rr and other in rr]
        return statistics.median(ratios) if ratios else None

    return {
        "batch_size": batch_size, "batch_bytes": batch_bytes, "rounds": rounds, "seconds": seconds,
        "configs": {c: {"num_workers": w, "num_slots": s} for c, (w, s) in cfgs.items()},
        "batches_per_s": rates, "errors": {c: e for c, e in errors.items() if e},
        "median_batches_per_s": medians, "best_fixed": best,
        "auto_over_best_fixed": auto / fixed[best] if auto and best else None,
        "auto_over_default": auto / medians[DEFAULT] if auto and medians.get(DEFAULT) else None,
        "auto_over_best_fixed_paired": paired(best), "auto_over_default_paired": paired(DEFAULT),
        "round_rates": round_rates,
        "auto_said": auto_said, "auto_rounds": auto_rounds, "epoch_batches": epoch_batches,
        "length": length,
    }


def render(name: str, r: dict) -> str:
    lines = [f"{name}: batch {r['batch_size']} ({r['batch_bytes'] / 1e6:.3g} MB), medians of {r['rounds']} "
             f"round(s) of {r['seconds']:g} s"]
    for c, m in sorted(r["median_batches_per_s"].items(), key=lambda kv: -kv[1]):
        cfg = r["configs"][c]
        lines.append(f"  {c:>8}  num_workers={cfg['num_workers']!s:>4} num_slots={cfg['num_slots']!s:>4}  "
                     f"{m:>12,.1f} batches/s")
    ab, ad = r["auto_over_best_fixed"], r["auto_over_default"]
    lines.append(f"  auto / best fixed ({r['best_fixed']}): {ab:.2f}" if ab is not None else
                 "  auto / best fixed: n/a")
    lines.append(f"  auto / today's default: {ad:.2f}" if ad is not None else "  auto / today's default: n/a")
    pb, pd = r.get("auto_over_best_fixed_paired"), r.get("auto_over_default_paired")
    if pb is not None and pd is not None:
        lines.append(f"  the same, paired by round (median of each round's ratio): {pb:.2f} and {pd:.2f}")
    runs = r.get("auto_rounds") or []
    if runs:
        epochs = sorted(a["epochs_started"] for a in runs)
        per = "?" if r["epoch_batches"] is None else f"{r['epoch_batches']:,}"
        lines.append(f"  auto's runs: {statistics.median(a['batches'] for a in runs):,.0f} batches (median), "
                     f"epochs of {per} batches, {epochs[0]}-{epochs[-1]} epoch(s) started"
                     + ("; no epoch end: auto ran as it started" if epochs[-1] <= 1 else ""))
    if r["auto_said"]:
        lines.append(f"  auto said: {r['auto_said']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(workloads.WORKLOADS),
                   help="comma-separated `shmfeed bench` workloads (default: all)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--data-dir", type=Path, default=None, help="as `shmfeed bench --data-dir`")
    p.add_argument("--data-rows", type=int, default=None, help="rows of each data file (small: a quick check)")
    p.add_argument("--length", type=int, default=None, help="samples per epoch (default: the workload's)")
    p.add_argument("--epoch-batches", type=int, default=None,
                   help="batches per epoch of the workloads whose length is free (per-sample, batch-level), "
                        "so that a run reaches the tuner's epoch ends; overrides --length for them")
    p.add_argument("--seed", type=int, default=0, help="of the round orders")
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    a = p.parse_args(argv)
    names = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in names if w not in workloads.WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(workloads.WORKLOADS)}")
    data_dir = a.data_dir or workloads.default_data_dir()
    doc = {"machine": {"cpus_usable": _sysinfo.usable_cpus().value}, "workloads": {}}
    for name in names:
        r = run_workload(name, a.rounds, a.seconds, data_dir, a.data_rows,
                         epoch_length(name, a.length, a.epoch_batches), a.seed)
        doc["workloads"][name] = r
        print(render(name, r), flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `shmfeed` command line (also `python -m shmfeed`).

Owns argument parsing and exit codes; the work is in `shmfeed._cli.bench` and
`shmfeed._cli.doctor`.

    shmfeed bench --workload compute --compare inline --step-ms 30 --seconds 3
    shmfeed bench --workload all --compare all --workers 2 --repeat 3 --json out.json --plot out.png
    shmfeed bench --device
    shmfeed doctor [--json]

Exit codes: 0 done (loaders that are not installed are skipped, not failures; the
doctor found no problem, warnings included); 1 a measurement failed, or the doctor
found a problem; 2 bad arguments (argparse's usage message) or an optional package
a bench option needs is missing, or the bench cannot run here (a data folder it cannot
write, batches beyond the memory left, an unusable /dev/shm a peer needs: one line
saying what to do, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .. import _sysinfo
from .bench import keras_fit, workloads
from .bench.loaders import LOADERS, PEERS

DEFAULT_WORKERS_MAX = 8  # the default worker count is the usable CPUs, at most this
DEFAULT_SECONDS = 3.0
MAX_STEP_MS = 10_000.0  # a simulated step longer than this measures nothing in a few seconds


def _usable_cpus() -> int:
    return _sysinfo.usable_cpus().value


def _number(parse: type, what: str, low: float, high: float | None = None, *,
            above: bool = False, unit: str = "") -> Callable[[str], Any]:
    """An argparse type: `parse(text)` (int or float, `what` it is called in the error)
    within [low, high] (`above`: low itself excluded; high None: no bound)."""

    def check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ((value > low if above else value >= low) and (high is None or value <= high)):  # NaN fails
            bounds = f"{'>' if above else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
            raise argparse.ArgumentTypeError(
                f"must be {bounds}{unit}, got {value if parse is int else text}")
        return value

    return check


_positive_int = _number(int, "a whole number", 1)
_seconds = _number(float, "a number of seconds", 0, 3600, above=True, unit=" seconds")
_step_ms = _number(float, "a number of milliseconds", 0, MAX_STEP_MS, unit=" ms")


def _workers(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _slots(text: str) -> int | str:
    from .._config import MAX_SLOTS

    if text == "auto":
        return text
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a ring needs at least 2 slots, got {value}")
    if value > MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"a ring has at most {MAX_SLOTS} slots, got {value}")
    return value


def _names(text: str, known: tuple[str, ...], what: str, extra: str = "") -> list[str]:
    """A comma-separated list of names from `known` ('all' for every one), in order."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        chosen = list(known) if name == "all" else [name]
        for n in chosen:
            if n not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {n!r}; known {what}s: {', '.join(known)}, or all{extra}")
            if n not in out:
                out.append(n)
    if not out:
        raise argparse.ArgumentTypeError(f"no {what} given; known {what}s: {', '.join(known)}, or all")
    return out


def _workloads(text: str) -> list[str]:
    return _names(text, tuple(workloads.WORKLOADS) + (keras_fit.NAME,), "workload")


def _loaders(text: str) -> list[str]:
    if text.strip() in ("none", "shmfeed"):
        return []
    names = _names(text, tuple(LOADERS), "loader", " (shmfeed itself is always measured)")
    return [n for n in names if n != "shmfeed"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="shmfeed", description="shmfeed: a shared-memory batch loader for JAX/Flax training loops.")
    parser.add_argument("--version", action="version", version=f"shmfeed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    workload_help = "; ".join([f"{w.name}: {w.about}" for w in workloads.WORKLOADS.values()]
                              + [f"{keras_fit.NAME} (alone): {keras_fit.ABOUT}"])
    bench = sub.add_parser(
        "bench", help="measure shmfeed against other loaders on synthetic data",
        description="Measure shmfeed, and the loaders named in --compare, on synthetic data "
                    "(generated once into --data-dir and reused). Each loader runs in its own "
                    "interpreter, one after the other. Workloads: " + workload_help + ".",
        epilog="Columns: batches/s and MB/s (medians over --repeat); x shmfeed: batches/s over "
               "shmfeed's; memcpy: MB/s over the memcpy bandwidth of a batch-sized buffer; "
               "startup: construction to first batch; peak PSS of the process tree; loop CPU ms: "
               "CPU time of the training process per batch (what loading costs it); input wait "
               "(with --step-ms): fraction of the time the loop waited in next(); without a step "
               "the loop only takes batches, so it is ~1 for every loader and left out.")
    bench.add_argument("--workload", type=_workloads, default=None, metavar="NAME[,NAME...]",
                       help=f"{', '.join(workloads.WORKLOADS)}, or all (default: transport)")
    bench.add_argument("--compare", type=_loaders, default=None, metavar="LOADER[,LOADER...]",
                       help=f"loaders to measure besides shmfeed: {', '.join(PEERS)}, all, or none "
                            "(default: inline); peers that are not installed are skipped")
    bench.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="samples per batch (default: per workload; for batchlevel, rows per "
                            "source batch)")
    bench.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                       help=f"worker processes of every loader (default: usable CPUs, at most "
                            f"{DEFAULT_WORKERS_MAX}; here {min(_usable_cpus(), DEFAULT_WORKERS_MAX)}); "
                            "auto: shmfeed's `num_workers=\"auto\"`, the others the count it starts with")
    bench.add_argument("--seconds", type=_seconds, default=None, metavar="S",
                       help=f"measured time per loader after its first batch (default: {DEFAULT_SECONDS:g})")
    bench.add_argument("--slots", type=_slots, default=None, metavar="N|auto",
                       help="shmfeed ring slots, also the in-flight cap of Pool.imap "
                            "(default: 2 x workers + 4, up to 4x that for batches small enough "
                            "that the ring stays within 8 MiB; auto: shmfeed's `num_slots=\"auto\"`, "
                            "the others that default)")
    bench.add_argument("--step-ms", type=_step_ms, default=0.0, metavar="MS",
                       help="simulate a training step of MS milliseconds after each batch (a "
                            "sleep: a GPU step leaves the CPU to the workers), so that input wait "
                            "says whether each loader keeps up (default: 0, no step)")
    bench.add_argument("--worker-nice", type=int, choices=range(20), default=0, metavar="N",
                       help="shmfeed's `worker_nice`: its workers run N nicer than the loop (default: 0)")
    bench.add_argument("--shuffle", action="store_true", help="shuffle samples every epoch")
    bench.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed (default: 0)")
    bench.add_argument("--repeat", type=_positive_int, default=1, metavar="N",
                       help="run every loader N times, interleaved; report medians (default: 1)")
    bench.add_argument("--data-dir", default=None, metavar="DIR",
                       help=f"where the synthetic data is cached (default: $SHMFEED_BENCH_DATA or "
                            f"{workloads.default_data_dir()})")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="write every number (runs, medians, machine) as JSON; - for stdout")
    bench.add_argument("--plot", default=None, metavar="FILE.png",
                       help="draw a bar chart of batches/s (needs matplotlib)")
    bench.add_argument("--no-headspace", action="store_true",
                       help="skip the headspace runs (each loader again on a zero-cost source: its ceiling)")
    bench.add_argument("--no-progress", action="store_true", help="print nothing on stderr while running")
    bench.add_argument("--device", action="store_true",
                       help="run the GPU upload benchmark of shmfeed.jax instead (takes --seconds "
                            "and --json)")
    # Hidden: small data for the tests.
    bench.add_argument("--data-rows", type=_positive_int, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--length", type=_positive_int, default=None, help=argparse.SUPPRESS)

    doctor = sub.add_parser(
        "doctor", help="check this machine and install for shmfeed: CPUs, memory, limits, GPU",
        description="Report, each with a verdict (ok / warn / problem) and a fix: usable CPUs, "
                    "memory and the cgroup limit, /dev/shm, RLIMIT_MEMLOCK/AS/NOFILE, the C core, "
                    "JAX, CuPy and GPUs, and the start method shmfeed would use. Starts no JAX "
                    "backend and no GPU library.",
        epilog="Exit code 1 when a check finds a problem, else 0 (warnings included).")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON on stdout")
    # Hidden: a fake cgroup hierarchy for the tests.
    doctor.add_argument("--cgroup-root", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            from . import doctor as _doctor

            root = _doctor.CGROUP_ROOT if args.cgroup_root is None else _path(args.cgroup_root)
            return _doctor.main(args.json, root)
        if args.device:
            return _device(args, parser)
        return _bench(args, parser, argv)
    except KeyboardInterrupt:
        print("shmfeed: interrupted", file=sys.stderr)
        return 130


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from .bench import BenchOptions, SetupError, report, run_bench

    if args.plot is not None and not args.plot.lower().endswith((".png", ".svg", ".pdf")):
        parser.error(f"--plot {args.plot!r}: give a .png, .svg or .pdf file name")
    # What the end of the run needs is checked before it starts, not after.
    if args.plot is not None:
        why = report.plot_unavailable()
        if why is not None:
            parser.error(f"--plot needs {why}; or leave --plot out (nothing was run)")
    for flag, dest in (("--json", args.json), ("--plot", args.plot)):
        if dest is not None and dest != "-":
            folder = _path(dest).parent
            if not folder.is_dir():
                parser.error(f"{flag} {dest!r}: the folder {str(folder)!r} does not exist (nothing was run)")
    names = args.workload or ["transport"]
    if keras_fit.NAME in names:
        return _keras_fit(args, parser, names, argv)
    if isinstance(args.workers, int) and args.workers > 4 * _usable_cpus():
        print(f"shmfeed: --workers {args.workers} on {_usable_cpus()} usable CPUs: "
              "expect the numbers to measure contention", file=sys.stderr)
    opts = BenchOptions(
        workloads=names,
        peers=args.compare if args.compare is not None else ["inline"],
        batch_size=args.batch_size,
        workers=args.workers or min(_usable_cpus(), DEFAULT_WORKERS_MAX),
        seconds=args.seconds or DEFAULT_SECONDS,
        slots=args.slots,
        shuffle=args.shuffle,
        seed=args.seed,
        repeat=args.repeat,
        data_rows=args.data_rows,
        length=args.length,
        progress=not args.no_progress,
        step_ms=args.step_ms,
        worker_nice=args.worker_nice,
        headspace=not args.no_headspace,
    )
    if args.data_dir is not None:
        opts.data_dir = _path(args.data_dir)
    try:
        doc = report.summarise(run_bench(opts))
    except SetupError as exc:
        print(f"shmfeed bench: {exc} (nothing was measured)", file=sys.stderr)
        return 2
    doc["command"] = ["shmfeed"] + argv
    out = sys.stderr if args.json == "-" else sys.stdout
    print(report.heading(doc), file=out)
    print(report.table(doc), file=out)
    for line in report.headspace(doc):
        print(line, file=out)
    print(report.legend(doc), file=out)
    for line in report.verdicts(doc):
        print(line, file=out)
    if args.json is not None:
        report.write_json(doc, args.json)
    if args.plot is not None:
        report.plot(doc, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    failed = report.failures(doc)
    for line in failed:
        print(f"shmfeed bench: failed: {line}", file=sys.stderr)
    if failed:
        print("shmfeed bench: the child's log of each failure is in the JSON (--json)", file=sys.stderr)
    return 1 if failed else 0


def _keras_fit(args: argparse.Namespace, parser: argparse.ArgumentParser, names: list[str],
               argv: list[str]) -> int:
    """`--workload keras-sequence`: model.fit with shmfeed, Keras's workers and in-process."""
    from .bench import SetupError, report

    if names != [keras_fit.NAME]:
        parser.error(f"--workload {keras_fit.NAME} trains a model and runs alone; it cannot be "
                     f"combined with {', '.join(n for n in names if n != keras_fit.NAME)}")
    given = [flag for flag, value in (("--compare", args.compare), ("--batch-size", args.batch_size),
                                      ("--seconds", args.seconds), ("--slots", args.slots),
                                      ("--plot", args.plot), ("--step-ms", args.step_ms or None),
                                      ("--worker-nice", args.worker_nice or None),
                                      ("--no-headspace", args.no_headspace or None))
             if value is not None]
    if args.workers == "auto":
        parser.error(f"--workload {keras_fit.NAME} gives Keras's workers and shmfeed's the same number: "
                     "--workers N, not auto")
    if given:
        parser.error(f"--workload {keras_fit.NAME} always compares shmfeed, Keras's workers and "
                     f"in-process loading over {keras_fit.EPOCHS} epochs (--repeat rounds); it does not take "
                     f"{', '.join(given)}")
    data_dir = _path(args.data_dir) if args.data_dir is not None else workloads.default_data_dir()
    try:
        doc = keras_fit.run(data_dir, args.workers or 2, args.repeat, progress=not args.no_progress)
    except SetupError as exc:
        print(f"shmfeed bench: {exc} (nothing was measured)", file=sys.stderr)
        return 2
    doc["command"] = ["shmfeed"] + argv
    out = sys.stderr if args.json == "-" else sys.stdout
    print(keras_fit.table(doc), file=out)
    if args.json is not None:
        report.write_json(doc, args.json)
    failed = [name for name, r in doc["loaders"].items() if r.get("status") != "ok"]
    for name in failed:
        print(f"shmfeed bench: failed: {keras_fit.NAME}/{name}: {doc['loaders'][name].get('reason', '')}",
              file=sys.stderr)
    return 1 if failed else 0


def _path(text: str):
    from pathlib import Path

    return Path(text).expanduser()


def _gpu_present() -> bool:
    return bool(_sysinfo.gpu_device_nodes())


def _device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = [flag for flag, value in (("--workload", args.workload), ("--compare", args.compare),
                                      ("--plot", args.plot), ("--step-ms", args.step_ms or None),
                                      ("--worker-nice", args.worker_nice or None),
                                      ("--no-headspace", args.no_headspace or None))
             if value is not None]
    if given:
        parser.error(f"--device measures the GPU upload only; it does not take {', '.join(given)}")
    seconds = args.seconds or DEFAULT_SECONDS
    try:
        from ..jax._bench import run_device_benchmark
    except ImportError as exc:
        gpu = _gpu_present()
        print(f"shmfeed bench --device: the device benchmark is not available here ({exc}); it "
              "needs shmfeed.jax and jax (pip install 'shmfeed[jax]')"
              + ("." if gpu else "; no GPU was found, so there is nothing to measure anyway."),
              file=sys.stderr)
        return 1 if gpu else 0
    result = run_device_benchmark(seconds)
    if args.json is not None:
        from .bench import report

        report.write_json({"device": result}, args.json)
    out = sys.stderr if args.json == "-" else sys.stdout
    if "skipped" in result:
        print(f"shmfeed bench --device: skipped: {result['skipped']}", file=out)
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{key.ljust(width)}  {shown}", file=out)
    return 0

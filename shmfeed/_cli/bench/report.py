"""Turning the runs into answers: medians over repeats, ratios, the table, the JSON
document and the bar chart.

Owns the meaning of every column:
- batches/s, MB/s: medians over repeats (MB = 10^6 bytes of delivered leaves);
- x shmfeed: the loader's median batches/s over shmfeed's, in the same run;
- memcpy: MB/s as a fraction of the memcpy bound (copying one batch-sized buffer,
  measured in the same run), i.e. how close the loader gets to a single copy;
- startup: construction of the loader to the first batch in hand (the interpreter's
  start and the loader's imports excluded);
- peak PSS (RSS where PSS is not readable): of the measuring process and all its
  descendants, sampled every 0.1 s; shared memory is split among the processes that
  map it in PSS and counted once per process in RSS;
- CPU s/GB: CPU seconds of the whole process tree (training process, workers,
  supervisor, pools, reaped ones included; child.py) over the measured time, per GB
  (10^9 bytes) of delivered leaves: what the loader costs, whatever its speed;
- headspace (a line per workload under the table): each loader's batches/s on the
  zero-cost twin of the source (`workloads.replay`, no step), its ceiling, and the
  measured rate as a share of it;
- loop CPU ms: CPU time of the training process (all its threads) per batch, the
  simulated step excluded: what loading costs the training loop's own process;
- input wait (only with `--step-ms`): fraction of the measured time the training loop
  spent in `next()`.  Without a step the loop does nothing but take batches, so it is
  near 1 for every loader and the table leaves it out (the JSON keeps it).

Documents written before a column existed render with "-" in it.  Under the table the CLI
prints `legend` (those meanings, in a few lines) and `verdicts` (shmfeed against in-process
loading, one line per workload).
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import IO

LOG_SCALE_SPREAD = 30  # a panel whose fastest bar is this many times its slowest gets a log axis
MEDIAN_FIELDS = ("batches_per_s", "MB_per_s", "startup_s", "input_wait_fraction",
                 "loop_cpu_ms_per_batch", "peak_rss_MB", "peak_pss_MB", "close_s",
                 "background_cpu_cores", "tree_cpu_s", "tree_cpu_cores", "cpu_s_per_GB")
HEADSPACE_FIELDS = ("batches_per_s", "MB_per_s", "cpu_s_per_GB", "source_item_us")


def summarise(doc: dict) -> dict:
    """Add a `summary` to each loader of each workload of `doc` (in place); return doc."""
    for entry in doc["workloads"].values():
        for info in entry["loaders"].values():
            runs = info["runs"]
            ok = [r for r in runs if r["status"] == "ok"]
            summary: dict = {"status": "ok" if ok else runs[0]["status"], "repeats": len(ok)}
            if not ok:
                summary["reason"] = runs[0].get("reason", "")
            else:
                for key in MEDIAN_FIELDS:
                    values = [r[key] for r in ok if r.get(key) is not None]
                    summary[key] = statistics.median(values) if values else None
                failed = [r for r in runs if r["status"] != "ok"]
                if failed:
                    summary["failed_repeats"] = len(failed)
                    summary["reason"] = failed[0].get("reason", "")
            info["summary"] = summary
            if info.get("headspace_runs"):
                _summarise_headspace(info["headspace_runs"], summary)
        base = entry["loaders"]["shmfeed"]["summary"]
        for info in entry["loaders"].values():
            s = info["summary"]
            if s["status"] != "ok":
                continue
            s["ratio_to_shmfeed"] = (s["batches_per_s"] / base["batches_per_s"]
                                     if base["status"] == "ok" and base["batches_per_s"] else None)
            s["memcpy_fraction"] = s["MB_per_s"] / entry["memcpy_MB_per_s"]
    return doc


def _summarise_headspace(runs: list[dict], summary: dict) -> None:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        summary["headspace_status"] = runs[0]["status"]
        summary["headspace_reason"] = runs[0].get("reason", "")
        return
    summary["headspace_status"] = "ok"
    for key in HEADSPACE_FIELDS:
        values = [r[key] for r in ok if r.get(key) is not None]
        summary[f"headspace_{key}"] = statistics.median(values) if values else None
    if summary["status"] == "ok" and summary["headspace_batches_per_s"]:
        summary["share_of_headspace"] = summary["batches_per_s"] / summary["headspace_batches_per_s"]


def failures(doc: dict) -> list[str]:
    """'workload/loader: reason' for every measurement that failed (skips are not failures)."""
    out = []
    for wname, entry in doc["workloads"].items():
        for lname, info in entry["loaders"].items():
            for kind, runs in (("", info["runs"]), (" headspace", info.get("headspace_runs", []))):
                for r in runs:
                    if r["status"] == "error":
                        out.append(f"{wname}/{lname}{kind} (repeat {r.get('repeat', 0) + 1}): {r['reason']}")
    return out


# -- the table --------------------------------------------------------------------------
COLUMNS = ("workload", "loader", "batches/s", "MB/s", "x shmfeed", "memcpy", "startup s",
           "peak PSS MB", "CPU s/GB", "loop CPU ms", "input wait")


def step_ms(doc: dict) -> float:
    return doc["options"].get("step_ms") or 0.0


def columns(doc: dict) -> tuple[str, ...]:
    """The table's columns: input wait only when a training step was simulated."""
    return COLUMNS if step_ms(doc) else COLUMNS[:-1]


def _cpu_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:,.2f}"


def _row(wname: str, label: str, s: dict, cols: tuple[str, ...]) -> list[str]:
    if s["status"] != "ok":
        return [wname, label, f"{s['status']}: {s['reason']}"]
    memory = s["peak_pss_MB"] if s["peak_pss_MB"] is not None else s["peak_rss_MB"]
    ratio = s["ratio_to_shmfeed"]
    cells = [
        wname, label,
        f"{s['batches_per_s']:,.0f}" if s["batches_per_s"] >= 100 else f"{s['batches_per_s']:,.1f}",
        f"{s['MB_per_s']:,.0f}",
        "-" if ratio is None else f"{ratio:.2f}",
        f"{s['memcpy_fraction']:.0%}" if s["memcpy_fraction"] >= 0.1 else f"{s['memcpy_fraction']:.1%}",
        f"{s['startup_s']:.2f}",
        f"{memory:,.0f}" + ("" if s["peak_pss_MB"] is not None else " (RSS)"),
        _cpu_ms(s.get("cpu_s_per_GB")),
        _cpu_ms(s.get("loop_cpu_ms_per_batch")),
        f"{s['input_wait_fraction']:.2f}",
    ]
    return cells[:len(cols)]


def table(doc: dict) -> str:
    """A Markdown pipe table, aligned so that it also reads well in a terminal."""
    cols = columns(doc)
    rows = []
    for wname, entry in doc["workloads"].items():
        for info in entry["loaders"].values():
            rows.append(_row(wname, info["label"], info["summary"], cols))
    widths = [max([len(c)] + [len(r[i]) for r in rows if i < len(r) and (i < 2 or len(r) == len(cols))])
              for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        if len(cells) < len(cols):  # a skipped or failed loader: its reason spans the rest
            cells = cells + [""] * (len(cols) - len(cells))
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells[:2], widths)) + " | " + cells[2] + " |"
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(list(cols)), sep] + [line(r) for r in rows])


def _workers(o: dict) -> str:
    if o["workers"] == "auto":
        return f"shmfeed num_workers=\"auto\" (the others {o['peer_workers']} workers)"
    return f"{o['workers']} workers"


def heading(doc: dict) -> str:
    o, m = doc["options"], doc["machine"]
    step = (f"a simulated {step_ms(doc):g} ms training step per batch" if step_ms(doc) else
            "no training step (--step-ms 0: input wait is ~1 for every loader, left out)")
    lines = [
        f"shmfeed {doc['shmfeed_version']} bench: {_workers(o)}, {o['seconds']:g} s per loader, {step}, "
        f"{o['repeat']} repeat(s) (medians), shuffle={o['shuffle']}; "
        f"{m['cpus_usable']} CPUs ({m['cpu_model']}), Python {m['python']}, load average "
        f"{m['load_avg_1min_at_start']:.1f} at start, {m.get('load_avg_1min_at_end', 0):.1f} at end",
    ]
    for wname, e in doc["workloads"].items():
        other = [r["background_cpu_cores"] for i in e["loaders"].values() for r in i["runs"]
                 if r.get("background_cpu_cores") is not None]
        noise = f", other processes used {min(other):.1f}-{max(other):.1f} CPUs meanwhile" if other else ""
        lines.append(f"  {wname}: batch {e['batch_size']} = {e['batch_bytes'] / 1e6:.3g} MB, "
                     f"memcpy bound {e['memcpy_MB_per_s']:,.0f} MB/s, "
                     f"one item in-process {e['item_us_in_process']:,.1f} us, "
                     f"{o.get('peer_workers', o['workers'])} plain processes read {e['ceiling_ratio']:.2f}x the items/s of one{noise}")
    return "\n".join(lines)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def headspace(doc: dict) -> list[str]:
    """One line per workload: each loader's ceiling on a zero-cost source and the
    measured rate's share of it; nothing for documents from before headspace runs."""
    out = []
    for wname, e in doc["workloads"].items():
        if e.get("headspace"):
            out.append(f"headspace ({wname}): {e['headspace']}")
            continue
        parts = []
        for info in e["loaders"].values():
            s = info["summary"]
            if "headspace_status" not in s:
                continue
            if s["headspace_status"] != "ok":
                parts.append(f"{info['label']} {s['headspace_status']}: {s.get('headspace_reason', '')}")
                continue
            share = s.get("share_of_headspace")
            parts.append(f"{info['label']} {_rate(s['headspace_batches_per_s'])}"
                         + ("" if share is None else f" ({share:.0%} used)"))
        if parts:
            out.append(f"headspace ({wname}, batches/s on a zero-cost source): " + ", ".join(parts))
    return out


LEGEND = {
    "startup s": "construction of the loader to the first batch in hand",
    "peak PSS MB": "peak memory of the run's whole process tree (training process and every "
                   "worker), shared pages split among the processes that map them",
    "CPU s/GB": "CPU seconds of that whole tree per GB delivered: what the batches cost, "
                "whatever the speed",
    "x shmfeed": "batches/s over shmfeed's in the same run (below 1: slower than shmfeed)",
    "memcpy": "MB/s as a share of one memcpy of the batch (how close to a single copy)",
    "loop CPU ms": "CPU time the training process spends per batch: what loading takes "
                   "from the training step itself",
    "input wait": "share of the time the training loop waited in next() for a batch",
}


HEADSPACE_LEGEND = ("each loader's ceiling: its batches/s when the source costs nothing (one "
                    "built sample replayed, no step); \"used\": the measured rate's share of it")


def legend(doc: dict) -> str:
    """What the table's less obvious columns and the headspace lines mean, one line each."""
    lines = [f"  {name}: {LEGEND[name]}" for name in LEGEND if name in columns(doc)]
    if any("headspace_status" in i["summary"] for e in doc["workloads"].values()
           for i in e["loaders"].values()):
        lines.append(f"  headspace: {HEADSPACE_LEGEND}")
    return "\n".join(lines)


def verdicts(doc: dict) -> list[str]:
    """One line per workload that ran shmfeed and in-process loading: the training loop's
    CPU per batch (what shmfeed saves whatever else runs on the machine), then the rates,
    with the CPUs the workers had when shmfeed came out slower."""
    out = []
    for wname, e in doc["workloads"].items():
        loaders = e["loaders"]
        if "inline" not in loaders:
            continue
        shm, inl = loaders["shmfeed"]["summary"], loaders["inline"]["summary"]
        if shm["status"] != "ok" or inl["status"] != "ok" or not inl["batches_per_s"]:
            continue
        speed = shm["batches_per_s"] / inl["batches_per_s"]
        line = f"verdict ({wname}): shmfeed delivered {speed:.2f}x the batches/s of in-process loading"
        shm_cpu, inl_cpu = shm.get("loop_cpu_ms_per_batch"), inl.get("loop_cpu_ms_per_batch")
        if shm_cpu and inl_cpu:
            line += (f", and its training loop spent {_cpu_ms(shm_cpu)} ms of CPU per batch "
                     f"instead of {_cpu_ms(inl_cpu)} ms ({inl_cpu / shm_cpu:,.0f}x less)")
        if step_ms(doc) and shm.get("input_wait_fraction") is not None:
            line += (f"; the loop waited for input {shm['input_wait_fraction']:.0%} of the time, "
                     f"in-process {inl['input_wait_fraction']:.0%}")
        if speed < 1 and e.get("ceiling_ratio"):
            o = doc["options"]
            line += (f" (slower here: {o.get('peer_workers', o['workers'])} plain processes read only "
                     f"{e['ceiling_ratio']:.2f}x the items/s of one on this machine now)")
        out.append(line)
    return out


def write_json(doc: dict, dest: str, stdout: IO[str] = sys.stdout) -> None:
    text = json.dumps(doc, indent=2, default=str)
    if dest == "-":
        stdout.write(text + "\n")
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


# -- the chart ----------------------------------------------------------------------------
def plot_unavailable() -> str | None:
    """Why `plot` cannot draw here (asked before a run, not after), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib cannot be imported ({exc}): pip install 'shmfeed[plot]'"
    return None


def plot(doc: dict, dest: str) -> None:
    """Draw batches/s per loader, one panel per workload (see `plot_unavailable`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["workloads"])
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.2 + 1.6 * len(names)), squeeze=False)
    for ax, wname in zip(axes[:, 0], names):
        loaders = [(i["label"], i["summary"]) for i in doc["workloads"][wname]["loaders"].values()
                   if i["summary"]["status"] == "ok"]
        labels = [lab for lab, _ in loaders][::-1]
        rates = [s["batches_per_s"] for _, s in loaders][::-1]
        colors = ["tab:orange" if lab == "shmfeed" else "tab:blue" for lab in labels]
        bars = ax.barh(labels, rates, color=colors)
        for bar, (_, s) in zip(bars, loaders[::-1]):
            ratio = s.get("ratio_to_shmfeed")
            ax.annotate(f" {s['batches_per_s']:,.0f}" + (f"  ({ratio:.2f}x)" if ratio else ""),
                        (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        va="center", fontsize=8)
        top, bottom = max(rates, default=1.0), min(rates, default=1.0)
        if top > LOG_SCALE_SPREAD * bottom:
            ax.set_xscale("log")
            ax.set_xlim(bottom / 2, top * 8)
            ax.set_title(f"{wname}: batches/s (median, log scale)", fontsize=10, loc="left")
        else:
            ax.set_xlim(0, top * 1.35)
            ax.set_title(f"{wname}: batches/s (median)", fontsize=10, loc="left")
        ax.tick_params(labelsize=8)
    o = doc["options"]
    fig.suptitle(f"shmfeed bench, {o['workers']} workers, {doc['machine']['cpus_usable']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)

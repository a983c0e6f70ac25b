"""The loaders `shmfeed bench` can measure, one adapter module each, all with one
interface so that the same loop (`child.py`) drives every one of them:

    adapter = module.Adapter(source, job)   # construct: workers start here
    for batch in adapter.epoch(e): ...      # one epoch of batches, in order
    adapter.stats()                         # loader-reported numbers, or None
    adapter.close()                         # every process and resource gone

An adapter only translates; the dataset object, its per-sample work and the batch
it yields are the same for all.  A batch may be a dict, tuple or single array of
numpy arrays or torch tensors: `child.touch` reads every leaf of it.

Modules are imported only in the child that measures them, so an uninstalled peer
costs nothing but a "skipped: not installed" line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass
from types import ModuleType


@dataclass(frozen=True)
class Job:
    """Everything a child needs to measure one loader on one workload (JSON-able)."""

    workload: str
    loader: str
    data_path: str
    length: int | None  # samples (or batches) per epoch; None: the workload's default
    batch_size: int
    workers: int | str  # "auto" only for shmfeed (runner._workers_of)
    slots: int | str | None
    shuffle: bool
    seed: int
    seconds: float
    step_ms: float = 0.0  # simulated training step after each batch (0: none)
    worker_nice: int = 0  # shmfeed's `worker_nice`
    replay: bool = False  # a headspace run: the source replays one built item (child.py)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoaderInfo:
    name: str
    module: str  # adapter module in this package
    label: str  # what the table calls it
    requires: str | None  # the distribution it needs, if not shmfeed's own dependencies
    extra: str | None  # the pyproject extra that installs it


LOADERS: dict[str, LoaderInfo] = {i.name: i for i in [
    LoaderInfo("shmfeed", "shmfeed_ring", "shmfeed", None, None),
    LoaderInfo("inline", "inline", "in-process", None, None),
    LoaderInfo("pickle", "mp_pool", "Pool.imap pickled", None, None),
    LoaderInfo("torch", "torch_dl", "torch DataLoader", "torch", "torch"),
    LoaderInfo("grain", "grain_dl", "Grain DataLoader", "grain", "grain"),
    LoaderInfo("keras", "keras_pydataset", "Keras PyDataset", "keras", "keras"),
]}
PEERS = tuple(n for n in LOADERS if n != "shmfeed")


def not_installed(name: str) -> str | None:
    """Why loader `name` cannot run here (without importing it), or None."""
    info = LOADERS[name]
    if info.requires is None:
        return None
    if importlib.util.find_spec(info.requires) is None:
        return f"not installed (pip install 'shmfeed[{info.extra}]')"
    if name == "keras":
        version = importlib.metadata.version("keras")
        if int(version.split(".")[0]) < 3:
            return f"keras {version} is installed; PyDataset needs keras>=3 (pip install 'shmfeed[keras]')"
    return None


def adapter_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{LOADERS[name].module}")

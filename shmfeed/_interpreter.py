"""Fresh interpreters that shmfeed starts (a spawned pool's supervisor, the benchmark's
children), and what crosses into them.

Owns: the command line of such an interpreter, which imports this very shmfeed (the
directory this package was imported from comes first on its `sys.path`, so a checkout
in the working directory cannot shadow an installed copy, nor the reverse); the
`sys.path` it adopts from the training process; and turning the source into bytes
that it can rebuild (`dump_source`), checked in the training process at once.

Invariants:
- The user's `__main__` is never imported or run again: classes, functions and lambdas
  defined there (a script, a notebook, `python -c`, stdin) travel by value with
  cloudpickle; everything importable travels by reference and is imported from the
  training process's `sys.path`.
- A source that cannot make the trip fails in the training process, with a
  `SourcePickleError` naming the attribute to blame, never later in a worker.
"""

from __future__ import annotations

import io
import mmap
import os
import socket
import sys
from typing import Any

import cloudpickle

from ._errors import SourcePickleError

# The directory holding the imported `shmfeed` package.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CULPRIT_DEPTH = 6  # how deep the search for an unpicklable attribute goes


def python_command(code: str) -> list[str]:
    """`python -c <code>` that imports the same shmfeed as this process."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); {code}"]


def parent_sys_path() -> list[str]:
    """This process's `sys.path`, with the working directory ('') made absolute."""
    return [PACKAGE_PARENT] + [os.path.abspath(p or os.getcwd()) for p in sys.path]


def adopt_sys_path(paths: list[str]) -> None:
    """Take the training process's `sys.path` (see `parent_sys_path`)."""
    sys.path[:] = list(dict.fromkeys(paths))


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj)


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def dump_source(source: Any, why: str) -> bytes:
    """The source as bytes a fresh interpreter rebuilds it from, after checking here
    that they load back.  `why` says why it must travel (for the error)."""
    try:
        data = cloudpickle.dumps(source)
    except Exception as exc:
        found = unpicklable_part(source, "source", 0)
        path, part, cause = found if found is not None else (None, source, exc)
        what = f"its attribute `{path}` ({type(part).__name__})" if path else type(source).__name__
        held = _held_resource(part)
        raise SourcePickleError(
            f"the source ({type(source).__name__}) cannot be sent to the worker processes: "
            f"{what} cannot be pickled ({type(cause).__name__}: {cause})"
            + (f"; it is {held} of this process, which a process started apart cannot share"
               if held else "")
            + f". They rebuild the source from bytes (in a fresh interpreter, or the fork server's "
            f"copy of this process) because {why}. Open such resources lazily in `__getitem__` "
            "(and leave them out of `__getstate__`), create the Loader before JAX/CUDA starts, or "
            "pass `start_method='fork'` to fork anyway (unsafe once JAX/CUDA threads run).",
            path) from exc
    try:
        cloudpickle.loads(data)
    except Exception as exc:
        raise SourcePickleError(
            f"the source ({type(source).__name__}) pickles but does not load back "
            f"({type(exc).__name__}: {exc}), so the worker processes could not rebuild it. "
            "Check its `__getstate__`/`__setstate__` or `__reduce__`.") from exc
    return data


def _held_resource(obj: Any) -> str | None:
    """'an open file ...' / 'an open socket' when `obj` is a descriptor's owner."""
    if isinstance(obj, io.IOBase):
        name = getattr(obj, "name", None)
        return "an open file" + (f" ({name!r})" if isinstance(name, str) else "")
    if isinstance(obj, socket.socket):
        return "an open socket"
    if isinstance(obj, mmap.mmap):
        return "an open memory map (wrap it in `np.memmap` to send it)"
    return None


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    out = [(f".{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                out.append((f".{name}", getattr(obj, name)))
    return out


def unpicklable_part(obj: Any, path: str, depth: int) -> tuple[str, Any, BaseException] | None:
    """The deepest part of `obj` that does not pickle: (path, part, error), or None."""
    for name, child in _children(obj):
        try:
            cloudpickle.dumps(child)
        except Exception as exc:
            deeper = unpicklable_part(child, path + name, depth + 1) if depth < _CULPRIT_DEPTH else None
            return deeper or (path + name, child, exc)
    return None

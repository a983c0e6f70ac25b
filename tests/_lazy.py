"""A module imported at its first attribute access, for test modules that need jax,
keras, ray or s3fs: pytest imports every test module before the first test runs, and
a test process holding those (~300 MB for keras) makes every fork of the fork tests,
which run first, cost ~0.1 s more (the page tables of the parent are copied).  The
tests that use them run last (conftest.py), and import them then."""

from __future__ import annotations

import importlib
from types import ModuleType


class Lazy:
    def __init__(self, name: str):
        self._name = name

    def module(self) -> ModuleType:
        """The module itself (for monkeypatch.setattr and the like)."""
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest's probes while collecting (fixture markers...)
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


def jit(fn):
    """`jax.jit(fn)`, made at the first call (a module-level `@jax.jit` imports jax)."""
    jitted = []

    def call(*args, **kwargs):
        if not jitted:
            jitted.append(importlib.import_module("jax").jit(fn))
        return jitted[0](*args, **kwargs)

    return call

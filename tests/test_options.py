"""Each Loader option is declared once (shmfeed/_options.py): the signature that
`help()` and type checkers read, the declarations that `build` checks, and the
Loader's docstring must not drift apart (issue 27, item 2)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import numpy as np
import pytest

import shmfeed
from shmfeed._errors import SpecError
from shmfeed._options import LoaderOptions, options_of

FIELDS = dataclasses.fields(LoaderOptions)
PARAMS = [p for name, p in inspect.signature(shmfeed.Loader.__init__).parameters.items()
          if name not in ("self", "source")]


def test_an_option_added_to_the_signature_or_the_declarations_alone_is_caught():
    assert [p.name for p in PARAMS] == [f.name for f in FIELDS]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in PARAMS)


def test_a_default_or_type_that_differs_between_signature_and_declaration_is_caught():
    for p, f in zip(PARAMS, FIELDS):
        declared = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert p.default == declared, p.name
        assert type(p.default) is type(declared), p.name  # 300 is not 300.0, 0 is not False
        assert p.annotation == f.type, p.name  # both strings (postponed annotations)


def test_batch_size_and_num_workers_stay_required():
    required = [p.name for p in PARAMS if p.default is inspect.Parameter.empty]
    assert required == ["batch_size", "num_workers"]
    with pytest.raises(TypeError, match="num_workers"):
        shmfeed.Loader(np.zeros(8), batch_size=2)  # type: ignore[call-arg]


def test_an_undocumented_option_is_caught():
    doc = shmfeed.Loader.__doc__ or ""
    for f in FIELDS:
        assert f.metadata["doc"].strip(), f.name
        assert f"`{f.name}`" in doc, f.name


def test_a_bad_value_of_each_self_checked_option_names_that_option():
    bad = {"batch_size": 0, "num_workers": -1, "seed": -1, "drop_last": 1, "num_slots": 1,
           "memory_budget_bytes": 0, "timeout_s": 0, "max_restarts": -1, "start_method": "thread",
           "seed_global_rngs": "yes", "shard_index": -1, "shard_count": 0, "with_lengths": None,
           "bucket_boundaries": [4, 2], "worker_nice": 20, "batch_transform": 3}
    checked = {f.name for f in FIELDS if f.metadata["check"] is not None}
    assert checked == set(bad)
    good = LoaderOptions(batch_size=2, num_workers=0)
    for name, value in bad.items():
        with pytest.raises(SpecError, match=f"`{name}`"):
            dataclasses.replace(good, **{name: value}).checked()
        with pytest.raises(SpecError, match=f"`{name}`"):
            shmfeed.Loader(np.zeros(8), **{**dataclasses.asdict(good), name: value})


def test_an_option_checked_nowhere_or_by_a_function_that_is_gone_is_caught():
    for f in FIELDS:
        check, where = f.metadata["check"], f.metadata["checked_by"]
        assert (check is None) != (not where), f.name  # one of the two, not both
        for name in filter(None, where.split(" (")[0].split(", ")):
            module, attr = name.rsplit(".", 1)
            assert callable(getattr(importlib.import_module(f"shmfeed.{module}"), attr)), (f.name, name)


def test_checked_options_are_what_the_loader_uses():
    given = LoaderOptions(batch_size=np.int64(4), num_workers=0, seed=None, timeout_s=5,
                          bucket_boundaries=[8, 16], drop_last=np.True_)
    out = given.checked()
    assert type(out.batch_size) is int and type(out.timeout_s) is float
    assert out.bucket_boundaries == (8, 16) and out.drop_last is True
    assert isinstance(out.seed, int)


def test_options_of_passes_every_argument_and_only_those():
    args = {f.name: (f.default if f.default is not dataclasses.MISSING else 1) for f in FIELDS}
    assert dataclasses.asdict(options_of({**args, "self": object(), "source": []})) == args
    del args["worker_nice"]
    with pytest.raises(KeyError, match="worker_nice"):
        options_of(args)

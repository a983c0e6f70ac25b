"""Property tests (issue 3, item 6): whatever the structure, dtypes and shapes of the
samples, the dataset length, batch size, `drop_last`, shuffle and number of workers,
the loader delivers exactly what a plain-Python reference builds in the loader's
order (`Order(...).batch_items(epoch, b)`); and an invalid sample is a SpecError naming
its index and field, never a crash of the training process.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _orders import epoch_items
from _trees import copy_tree as copy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed._order.order import Order

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]
PY_SCALARS = [bool, int, float, complex]
# Each example starts a Loader (up to 4 workers): the default tier tries a few dozen, the
# `integration` tier a few hundred; SHMFEED_PROPERTY_EXAMPLES sets both (RELIABILITY.md).
_EXAMPLES = os.environ.get("SHMFEED_PROPERTY_EXAMPLES")
EXAMPLES = [int(_EXAMPLES or 25), pytest.param(int(_EXAMPLES or 250), marks=pytest.mark.integration)]


def examples(n: int):
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A template is the structure of a sample: ("leaf", dtype, shape) for an array,
# ("py", type) for a Python scalar, ("dict", {key: template}), ("tuple"|"list", [template]).
leaves = st.one_of(
    st.tuples(st.just("leaf"), st.sampled_from(DTYPES),
              st.lists(st.integers(0, 3), max_size=3).map(tuple)),  # 0-d and zero-size included
    st.tuples(st.just("py"), st.sampled_from(PY_SCALARS)),
)
templates = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3).map(lambda d: ("dict", d)),
        st.lists(children, min_size=1, max_size=3).map(lambda xs: ("tuple", xs)),
        st.lists(children, min_size=1, max_size=3).map(lambda xs: ("list", xs)),
    ),
    max_leaves=5,
)


def _value(leaf: tuple, i: int, k: int):
    """Leaf k of sample i: distinct per sample and per leaf, exactly representable."""
    if leaf[0] == "py":
        t = leaf[1]
        return t(i % 2) if t is bool else t(i * 10 + k)
    _, dtype, shape = leaf
    n = int(np.prod(shape, dtype=np.int64))
    base = (np.arange(n) + i * 10 + k) % (2 if dtype is np.bool_ else 100)
    return base.astype(dtype).reshape(shape)


def build(template, i: int, counter=None):
    """Sample i of a template (leaves numbered depth first, as the spec flattens)."""
    counter = counter if counter is not None else [0]
    kind = template[0]
    if kind in ("leaf", "py"):
        counter[0] += 1
        return _value(template, i, counter[0] - 1)
    if kind == "dict":
        return {key: build(t, i, counter) for key, t in template[1].items()}
    items = [build(t, i, counter) for t in template[1]]
    return tuple(items) if kind == "tuple" else items


def stack(samples: list):
    """The reference batch: the samples stacked leaf by leaf, in plain Python."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: stack([s[k] for s in samples]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack([s[j] for s in samples]) for j in range(len(first)))
    return np.stack([np.asarray(s) for s in samples])


def assert_same(got, want, path="") -> None:
    assert type(got) is type(want), (path, type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), path
        for j, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{j}]")
    else:
        assert got.dtype == want.dtype and got.shape == want.shape, (path, got.dtype, got.shape, want.dtype, want.shape)
        assert np.array_equal(got, want), path


class Source:
    def __init__(self, template, n: int, bad: dict | None = None):
        self.template, self.n, self.bad = template, n, bad or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.bad[i] if i in self.bad else build(self.template, i)


@pytest.mark.parametrize("n_examples", EXAMPLES)
def test_loader_output_equals_the_in_process_reference(n_examples):
    examples(n_examples)(given(
        template=templates, n=st.integers(1, 30), batch_size=st.integers(1, 8),
        drop_last=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 3),
        num_workers=st.integers(0, 4))(_loader_output_equals_the_reference))()


def _loader_output_equals_the_reference(template, n, batch_size, drop_last, shuffle, seed,
                                        num_workers):
    assume(not (drop_last and n < batch_size))
    source = Source(template, n)
    order = Order(n, batch_size, shuffle, seed, drop_last)
    with shmfeed.Loader(source, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                        seed=seed, drop_last=drop_last) as loader:
        assert len(loader) == order.n_batches
        for epoch in range(2):
            got = [copy(b) for b in loader]
            assert len(got) == order.n_batches
            for b, batch in enumerate(got):
                items = order.batch_items(epoch, b)
                assert_same(batch, stack([build(template, int(i)) for i in items]), f"batch {b}")


def _leaf_paths(template, path=""):
    """(path, leaf) of every leaf, paths written as the spec writes them."""
    kind = template[0]
    if kind in ("leaf", "py"):
        return [(path, template)]
    if kind == "dict":
        return [p for k, t in template[1].items() for p in _leaf_paths(t, f"{path}[{k!r}]")]
    return [p for j, t in enumerate(template[1]) for p in _leaf_paths(t, f"{path}[{j}]")]


def _replace(sample, path_keys: list, value):
    if not path_keys:
        return value
    head, rest = path_keys[0], path_keys[1:]
    if isinstance(sample, dict):
        return {k: (_replace(v, rest, value) if k == head else v) for k, v in sample.items()}
    items = [(_replace(v, rest, value) if j == head else v) for j, v in enumerate(sample)]
    return tuple(items) if isinstance(sample, tuple) else items


def _keys(template) -> list[list]:
    kind = template[0]
    if kind in ("leaf", "py"):
        return [[]]
    if kind == "dict":
        return [[k] + rest for k, t in template[1].items() for rest in _keys(t)]
    return [[j] + rest for j, t in enumerate(template[1]) for rest in _keys(t)]


CORRUPTIONS = ["ragged", "object", "none", "string", "dtype", "structure"]


def corrupt(template, i: int, leaf_no: int, how: str):
    """Sample i with leaf `leaf_no` made invalid; returns (sample, path in the message)."""
    sample = build(template, i)
    path, leaf = _leaf_paths(template)[leaf_no]
    keys = _keys(template)[leaf_no]
    if how == "structure":
        # Structure differs above the leaf: a dict with a key missing, or a sequence
        # one item short; at the top level, a bare number where a tree was.
        if not keys:
            return {"unexpected": np.zeros(1)}, ""
        parent = keys[:-1]
        node = sample
        for k in parent:
            node = node[k]
        if isinstance(node, dict):
            shrunk = {k: v for k, v in node.items() if k != keys[-1]}
        else:
            shrunk = type(node)(v for j, v in enumerate(node) if j != keys[-1])
        if not shrunk:
            shrunk = 3.5
        parent_path = "".join(f"[{k!r}]" for k in parent)
        return _replace(sample, parent, shrunk), parent_path
    if how == "ragged":
        shape = () if leaf[0] == "py" else leaf[2]
        bad = np.zeros(shape + (2,), np.float32)
    elif how == "object":
        bad = np.array([object()], dtype=object)
    elif how == "none":
        bad = None
    elif how == "string":
        bad = "not a number"
    else:  # dtype
        want = np.asarray(_value(leaf, i, leaf_no)).dtype
        other = np.int16 if want != np.int16 else np.int8
        bad = np.zeros(() if leaf[0] == "py" else leaf[2], other)
    return _replace(sample, keys, bad), path


@pytest.mark.parametrize("n_examples", EXAMPLES)
def test_invalid_sample_is_a_spec_error_with_index_and_field_path(n_examples):
    examples(n_examples)(given(
        template=templates, n=st.integers(2, 24), batch_size=st.integers(1, 6),
        shuffle=st.booleans(), num_workers=st.sampled_from([0, 2]),
        how=st.sampled_from(CORRUPTIONS), data=st.data())(_invalid_sample_is_a_spec_error))()


def _invalid_sample_is_a_spec_error(template, n, batch_size, shuffle, num_workers, how, data):
    order = Order(n, batch_size, shuffle, 0, False)
    perm = epoch_items(order, 0)
    # Not the first sample of epoch 0: that one defines the spec.
    bad_index = int(data.draw(st.sampled_from(sorted(int(i) for i in perm[1:])), label="bad_index"))
    leaf_no = data.draw(st.integers(0, len(_leaf_paths(template)) - 1), label="leaf")
    bad, path = corrupt(template, bad_index, leaf_no, how)
    source = Source(template, n, {bad_index: bad})
    with shmfeed.Loader(source, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle) as loader:
        got = []
        with pytest.raises(shmfeed.SpecError) as info:
            for batch in loader:
                got.append(copy(batch))
        msg = str(info.value)
        assert f"sample {bad_index}, field {path or '(root)'}" in msg, msg
        bad_batch = int(np.nonzero(perm == bad_index)[0][0]) // batch_size
        assert len(got) == bad_batch  # every batch before it was delivered...
        for b, batch in enumerate(got):  # ...intact
            items = perm[b * batch_size:(b + 1) * batch_size]
            assert_same(batch, stack([build(template, int(i)) for i in items]), f"batch {b}")

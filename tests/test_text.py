"""Strings and ids in a batch (issue 28): `str`/`bytes` leaves and numpy `U`/`S` arrays
ride along as fixed-width numpy arrays, the width from `padded_shapes` or probed; text
wider than its slot is an error naming sample and field, never cut silently."""

from __future__ import annotations

import numpy as np
import pytest

import shmfeed


class Captioned:
    """Sample i: a file name (str), an id (bytes), a number and a row of tags (U array);
    sample `long` has a file name of `long_chars` characters."""

    def __init__(self, n: int, long: int = -1, long_chars: int = 40):
        self.n, self.long, self.long_chars = n, long, long_chars

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = "x" * self.long_chars if i == self.long else f"img_{i}.jpg"
        return {"name": name, "id": b"id-%d" % i, "label": i,
                "tags": np.array(["cat", "dog" * (i % 3)])}


def _names(loader) -> list[list[str]]:
    return [[str(s) for s in b["name"]] + [bytes(s).decode() for s in b["id"]] for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_text_leaves_arrive_as_fixed_width_arrays_in_order(num_workers):
    with shmfeed.Loader(Captioned(10), batch_size=4, num_workers=num_workers, shuffle=True, seed=1) as loader:
        assert loader.spec.describe() == "['name']: <U16[4], ['id']: |S16[4], ['label']: int64[4], ['tags']: <U16[4, 2]"
        batches = [{k: v.copy() for k, v in b.items()} for b in loader]
    for b in batches:
        assert [str(s) for s in b["name"]] == [f"img_{i}.jpg" for i in b["label"]]
        assert list(b["id"]) == [b"id-%d" % i for i in b["label"]]
        assert [list(t) for t in b["tags"]] == [["cat", "dog" * (i % 3)] for i in b["label"]]
    assert sorted(i for b in batches for i in b["label"]) == list(range(10))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_text_wider_than_its_slot_names_sample_and_field_instead_of_cutting(num_workers):
    with shmfeed.Loader(Captioned(12, long=6), batch_size=4, num_workers=num_workers) as loader:
        got = []
        with pytest.raises(shmfeed.SpecError, match=r"sample 6, field \['name'\]: text of 40 characters, "
                                                   r"wider than the 16 its slot holds .*`padded_shapes`"):
            for b in loader:
                got.append(b["name"].copy())
        assert len(got) == 1


def test_text_width_from_padded_shapes_holds_longer_text():
    with shmfeed.Loader(Captioned(8, long=5, long_chars=60), batch_size=4, num_workers=0,
                        padded_shapes={"name": 64, "id": 8}) as loader:
        assert loader.spec.leaves[0].dtype == np.dtype("<U64") and loader.spec.leaves[1].dtype == np.dtype("S8")
        names = [str(s) for b in loader for s in b["name"]]
    assert names[5] == "x" * 60


@pytest.mark.parametrize(("padded", "needle"), [
    ({"name": 0}, r"field \['name'\]: a text field's width must be an int > 0 .*got 0"),
    ({"label": 8}, r"field \['label'\]: 8 is a width, for a text field; this field has dtype int64"),
])
def test_bad_text_widths_are_refused_by_field(padded, needle):
    with pytest.raises(shmfeed.SpecError, match=needle):
        shmfeed.Loader(Captioned(8), batch_size=4, num_workers=0, padded_shapes=padded)


class CaptionBatches:
    """A batch-level source: batch b holds captions of width 3 + 10*b characters."""

    def __len__(self):
        return 3

    def __getitem__(self, b):
        return {"caption": np.array(["abc" + "z" * 10 * b] * 2), "n": np.arange(2)}


def test_batch_level_text_narrower_widens_and_wider_names_the_batch():
    with shmfeed.Loader(CaptionBatches(), batch_size=None, num_workers=0) as loader:
        it = iter(loader)
        assert list(next(it)["caption"]) == ["abc", "abc"]
        assert list(next(it)["caption"]) == ["abc" + "z" * 10] * 2
        with pytest.raises(shmfeed.SpecError, match=r"batch 2, field \['caption'\]: text of 23 characters"):
            next(it)


def test_a_batch_of_strings_is_tokenized_by_a_batch_transform():
    def tokenize(batch):
        ids = np.zeros((len(batch["name"]), 12), np.int32)
        for row, name in enumerate(batch["name"]):
            code = np.frombuffer(str(name).encode(), np.uint8)[:12]
            ids[row, : len(code)] = code
        return {"ids": ids, "label": batch["label"]}
    with shmfeed.Loader(Captioned(8), batch_size=4, num_workers=1, batch_transform=tokenize) as loader:
        first = next(iter(loader))
        assert first["ids"].dtype == np.int32 and bytes(first["ids"][1][:9].astype(np.uint8)) == b"img_1.jpg"

"""Sources over data where it lives (issue 29): `Parquet` files and `Arrow` tables /
Hugging Face datasets, read by row in forked workers; bad files named in errors that
arrive in batch order."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import shmfeed
from shmfeed._batch.build import gatherer
from shmfeed._batch.spec import infer
from shmfeed.sources import Arrow, Parquet, SourceFileError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [50, 37]  # rows of the two files
GROUP = 8  # rows per row group


def _table(first: int, n: int) -> pa.Table:
    i = np.arange(first, first + n)
    return pa.table({
        "x": pa.FixedSizeListArray.from_arrays(pa.array((i[:, None] * [1, 2, 3]).astype(np.float32).ravel()), 3),
        "img": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(i, 4).astype(np.uint8)), 2), 2),
        "y": pa.array(i, pa.int64()),
        "ok": pa.array(i % 3 == 0),
        "tokens": pa.array([list(range(k, k + k % 5 + 1)) for k in i], pa.list_(pa.int32())),
    })


def _expected(i: int) -> dict:
    return {"x": np.float32(i) * np.array([1, 2, 3], np.float32), "img": np.full((2, 2), i % 256, np.uint8),
            "y": i, "ok": i % 3 == 0, "tokens": np.arange(i, i + i % 5 + 1, dtype=np.int32)}


@pytest.fixture
def files(tmp_path):
    paths, first = [], 0
    for k, n in enumerate(ROWS):
        p = tmp_path / f"part-{k}.parquet"
        pq.write_table(_table(first, n), p, row_group_size=GROUP)
        paths.append(str(p))
        first += n
    return paths


def _all_rows(loader, key="y"):
    return [int(v) for b in loader for v in b[key]]


def test_rows_are_the_files_rows_by_index(files):
    src = Parquet(files)
    assert len(src) == sum(ROWS) and src.num_row_groups == 7 + 5
    for i in [0, 7, 8, 49, 50, 86, -1]:
        got, want = src[i], _expected(i % len(src))
        assert list(got) == ["x", "img", "y", "ok", "tokens"]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(IndexError):
        src[len(src)]


@pytest.mark.parametrize("num_workers,start_method", [(0, "fork"), (2, "fork"), (2, "spawn")])
def test_every_row_comes_once_shuffled_and_matches_for_any_num_workers(files, num_workers, start_method):
    src = Parquet(files, columns=["x", "img", "y", "ok"])
    kw = dict(batch_size=10, shuffle=True, seed=3)
    with shmfeed.Loader(src, num_workers=num_workers, start_method=start_method, **kw) as loader:
        batches = [{k: v.copy() for k, v in b.items()} for b in loader]
    with shmfeed.Loader(src, num_workers=0, **kw) as ref:
        assert [b["y"].tolist() for b in ref] == [b["y"].tolist() for b in batches]
    assert sorted(int(y) for b in batches for y in b["y"]) == list(range(sum(ROWS)))
    for b in batches:
        for r, y in enumerate(b["y"]):
            want = _expected(int(y))
            for k in ("x", "img", "ok"):
                np.testing.assert_array_equal(b[k][r], want[k])


def test_batches_are_gathered_by_column_like_rows_by_index(files):
    src = Parquet(files, columns=["x", "img", "y", "ok"])
    spec = infer(src[0], rows=6, index=0)
    gather = gatherer(src, spec)
    assert gather is not None  # no Python per row
    # shuffled; ordered in one row group (copied as a slice); ordered across two; in one
    # row group, first and last 5 apart, but not in order
    for idx in ([86, 3, 60, 4, 49, 50], [16, 17, 18, 19, 20, 21], [5, 6, 7, 8, 9, 10], [0, 2, 1, 3, 4, 5]):
        idx = np.array(idx, np.int64)
        out = [np.zeros((6,) + lf.shape, lf.dtype) for lf in spec.leaves]
        gather(idx, out)
        for name, col in zip(src.columns, out):
            np.testing.assert_array_equal(col, np.stack([src[int(i)][name] for i in idx]))
    # a last, short batch fills the first rows of the slot's leaves and no others
    out = [np.zeros((6,) + lf.shape, lf.dtype) for lf in spec.leaves]
    gather(np.array([84, 85, 86], np.int64), out)
    for name, col in zip(src.columns, out):
        np.testing.assert_array_equal(col[:3], np.stack([src[i][name] for i in (84, 85, 86)]))
        assert not col[3:].any()


class _CountedParquet(Parquet):
    """Appends the process and row group of every row-group decode to `log`."""

    def __init__(self, *args, log: str, **kw):
        super().__init__(*args, **kw)
        self.log = log

    def _read_chunk(self, k):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {k}\n")
        return super()._read_chunk(k)


@pytest.mark.parametrize("shuffle,start_method", [(False, "fork"), (True, "fork"), (False, "spawn")])
def test_the_workers_decode_each_row_group_once_between_them_not_once_each_or_per_batch(files, tmp_path, shuffle,
                                                                                        start_method):
    # Batches of 2 rows: 4 to a row group (in order), in one or two row groups
    # (shuffled); batches go to the workers in turn, so without the pool's shared cache
    # each worker decoded every row group (24 decodes an epoch), and per batch 44 or more.
    log = tmp_path / "decodes"
    src = _CountedParquet(files, columns=["x", "y"], log=str(log))
    with shmfeed.Loader(src, batch_size=2, num_workers=2, shuffle=shuffle, seed=1,
                        start_method=start_method) as loader:
        for epoch in range(2):
            log.write_text("")
            loader.set_epoch(epoch)
            assert sorted(_all_rows(loader)) == list(range(sum(ROWS)))
            decodes = sorted(int(k) for pid, k in (line.split() for line in log.read_text().splitlines())
                             if int(pid) != os.getpid())  # the Loader reads row 0 here, for the spec
            # every row group once, by whichever worker came first; then all are cached
            assert decodes == (list(range(src.num_row_groups)) if epoch == 0 else []), epoch


class _KilledInRowGroup3(Parquet):
    """SIGKILLs the first process that decodes row group 3, mid-decode."""

    def __init__(self, *args, marker: str, **kw):
        super().__init__(*args, **kw)
        self.marker = marker

    def _read_chunk(self, k):
        if k == 3:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super()._read_chunk(k)


def test_a_worker_killed_while_it_decodes_a_shared_row_group_loses_and_repeats_no_row(files, tmp_path):
    marker = tmp_path / "killed"
    src = _KilledInRowGroup3(files, columns=["x", "y"], marker=str(marker))
    with shmfeed.Loader(src, batch_size=4, num_workers=2) as loader:
        batches = [{k: v.copy() for k, v in b.items()} for b in loader]
    assert marker.exists()  # the kill happened
    assert [int(y) for b in batches for y in b["y"]] == list(range(sum(ROWS)))
    for b in batches:
        for x, y in zip(b["x"], b["y"]):
            np.testing.assert_array_equal(x, _expected(int(y))["x"])


def test_variable_length_rows_are_padded_with_padded_shapes(files):
    with shmfeed.Loader(Parquet(files, columns=["y", "tokens"]), batch_size=10, num_workers=2,
                        padded_shapes={"tokens": [5]}) as loader:
        seen = 0
        for b in loader:
            for y, t in zip(b["y"], b["tokens"]):
                want = _expected(int(y))["tokens"]
                np.testing.assert_array_equal(t[: len(want)], want)
                assert not t[len(want):].any()
                seen += 1
    assert seen == sum(ROWS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_rows_of_different_lengths_without_padding_name_file_row_group_row_and_column(files, num_workers):
    with shmfeed.Loader(Parquet(files, columns=["tokens"]), batch_size=4, num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.ShmfeedError, match=r"part-0.parquet', row group 0, column 'tokens': "
                           r"row 1 holds 2 values where the batch has room for 1.*`padded_shapes`"):
            for _ in loader:
                pass


def test_workers_forked_after_the_parent_ran_pyarrow_threads_read_every_row(files, tmp_path):
    # Start pyarrow's thread pools in this process first: a worker must not use them.
    big = pa.table({"v": np.arange(2_000_000, dtype=np.int64)})
    pq.write_table(big, tmp_path / "big.parquet", row_group_size=100_000)
    assert pq.read_table(tmp_path / "big.parquet", use_threads=True).num_rows == 2_000_000
    src = Parquet(files, columns=["y"])
    src[0]  # and opened the files here
    with shmfeed.Loader(src, batch_size=9, num_workers=2, shuffle=True, timeout_s=30) as loader:
        for _ in range(2):
            assert sorted(_all_rows(loader)) == list(range(sum(ROWS)))


def test_a_truncated_file_is_refused_at_construction_naming_it(files):
    with open(files[1], "rb") as f:
        data = f.read()
    with open(files[1], "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(SourceFileError, match=r"part-1.parquet'.*truncated, corrupt or not Parquet"):
        Parquet(files)


def test_a_missing_column_or_an_unreadable_type_is_refused_naming_it(files, tmp_path):
    with pytest.raises(shmfeed.SpecError, match=r"part-0.parquet' has no column 'label' \(its columns: "
                       r"x, img, y, ok, tokens\)"):
        Parquet(files, columns=["y", "label"])
    p = tmp_path / "s.parquet"
    pq.write_table(pa.table({"s": ["a", "b"], "y": [1, 2]}), p)
    with pytest.raises(shmfeed.SpecError, match=r"column 's' has Arrow type string.*`columns=\[...\]`"):
        Parquet(p)
    assert Parquet(p, columns="y")[1] == {"y": 2}


def _png(i: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 3, 3), i % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode_png(row: dict) -> dict:
    import io

    from PIL import Image
    return {"image": np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), "label": row["label"]}


@pytest.fixture
def image_file(tmp_path):
    pytest.importorskip("PIL")
    # Hugging Face's Image feature: a struct of the encoded bytes and a path.
    images = pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(30)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    p = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": images, "label": pa.array(np.arange(30))}), p, row_group_size=8)
    return str(p)


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_image_bytes_column_is_decoded_by_decode_in_the_workers_row_by_row(image_file, shuffle):
    src = Parquet(image_file, decode=_decode_png)
    with shmfeed.Loader(src, batch_size=7, num_workers=2, shuffle=shuffle, seed=2) as loader:
        batches = [{k: v.copy() for k, v in b.items()} for b in loader]
    with shmfeed.Loader(src, batch_size=7, num_workers=0, shuffle=shuffle, seed=2) as ref:
        assert [b["label"].tolist() for b in ref] == [b["label"].tolist() for b in batches]
    assert sorted(int(y) for b in batches for y in b["label"]) == list(range(30))
    for b in batches:
        assert b["image"].shape[1:] == (4, 3, 3) and b["image"].dtype == np.uint8
        for img, y in zip(b["image"], b["label"]):
            assert (img == y).all()
    table = pq.read_table(image_file)
    got = Arrow(table, decode=_decode_png)[9]
    assert got["label"] == 9 and (got["image"] == 9).all()


def test_a_binary_column_without_decode_is_refused_naming_decode(image_file):
    with pytest.raises(shmfeed.SpecError, match=r"column 'image' has Arrow type struct.*`decode=`"):
        Parquet(image_file)
    with pytest.raises(shmfeed.SpecError, match=r"`decode` must be a function"):
        Parquet(image_file, decode="png")


def test_an_exception_in_decode_arrives_in_batch_order_naming_row_and_row_group(image_file):
    def decode(row):
        if row["label"] == 19:
            raise ValueError("bad image")
        return _decode_png(row)

    got = []
    with shmfeed.Loader(Parquet(image_file, decode=decode), batch_size=5, num_workers=2) as loader:
        with pytest.raises(shmfeed.ShmfeedError, match=r"bad image") as err:
            for b in loader:
                got += b["label"].tolist()
    assert got == list(range(15))
    assert "in `decode` of row 19, Parquet file" in str(err.value) and "row group 2" in str(err.value)


def test_a_corrupt_row_group_arrives_in_batch_order_naming_file_and_row_group(files):
    meta = pq.read_metadata(files[0])
    col = meta.row_group(2).column(0)
    at = col.dictionary_page_offset or col.data_page_offset
    with open(files[0], "r+b") as f:  # the page header of row group 2: garbage
        f.seek(at)
        f.write(b"\xff" * 24)
    src = Parquet(files, columns=["x", "y"])  # the footer is intact
    got = []
    with shmfeed.Loader(src, batch_size=GROUP, num_workers=2) as loader:
        with pytest.raises(shmfeed.ShmfeedError, match=r"part-0.parquet', row group 2 \(rows 16..23\): cannot "
                           r"decode it.*corrupt"):
            for b in loader:
                got.append(b["y"].tolist())
    assert got == [list(range(0, 8)), list(range(8, 16))]


def test_a_file_rewritten_after_construction_is_an_error_not_other_rows(files):
    src = Parquet(files, columns=["y"])
    pq.write_table(_table(1000, 20), files[1], row_group_size=GROUP)
    os.utime(files[1], ns=(1, 1))
    with shmfeed.Loader(src, batch_size=10, num_workers=2) as loader:
        with pytest.raises(shmfeed.ShmfeedError, match=r"part-1.parquet' changed since the source was made"):
            for _ in loader:
                pass


def test_a_null_is_an_error_naming_its_row(tmp_path):
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"y": pa.array([1, 2, None, 4], pa.int64())}), p)
    with pytest.raises(SourceFileError, match=r"n.parquet', row group 0, column 'y': row 2 is null"):
        Parquet(p)[0]


def test_a_null_inside_a_list_is_an_error_not_a_nan_cast_to_int(tmp_path):
    p = tmp_path / "n.parquet"
    x = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, None, 4], pa.int32()), 2)
    pq.write_table(pa.table({"x": x, "t": pa.array([[1], [None]], pa.list_(pa.int32()))}), p)
    for col in ("x", "t"):
        with pytest.raises(SourceFileError, match=rf"n.parquet', row group 0, column '{col}': 1 null value"):
            Parquet(p, columns=[col])[0]


def test_an_arrow_table_gives_its_rows_in_forked_and_spawned_workers(files):
    table = pa.concat_tables([_table(0, 50), _table(50, 37)]).select(["x", "y"])
    src = Arrow(table, chunk_rows=16)
    np.testing.assert_array_equal(src[40]["x"], _expected(40)["x"])
    for start in ("fork", "spawn"):
        with shmfeed.Loader(src, batch_size=10, num_workers=2, shuffle=True, start_method=start) as loader:
            rows = [(int(y), x.tolist()) for b in loader for y, x in zip(b["y"], b["x"])]
        assert sorted(rows) == [(i, _expected(i)["x"].tolist()) for i in range(87)]


@pytest.mark.imports_big
def test_a_hugging_face_dataset_gives_its_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"x": datasets.Sequence(datasets.Value("float32"), length=3),
                                  "y": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"x": [[i, 2 * i, 3 * i] for i in range(40)], "y": list(range(40))},
                                    features=features)
    with shmfeed.Loader(Arrow(ds), batch_size=8, num_workers=2, shuffle=True) as loader:
        rows = sorted((int(y), x.tolist()) for b in loader for y, x in zip(b["y"], b["x"]))
    assert rows == [(i, [float(i), 2.0 * i, 3.0 * i]) for i in range(40)]
    with pytest.raises(shmfeed.SpecError, match=r"flatten_indices"):
        Arrow(ds.shuffle(seed=0))
    flat = Arrow(ds.shuffle(seed=0).flatten_indices())
    assert sorted(int(flat[i]["y"]) for i in range(40)) == list(range(40))


def test_a_process_keeps_decoded_row_groups_within_cache_bytes(files):
    src = Parquet(files, columns=["x", "y"], cache_bytes=1)  # only the last row group
    for i in range(0, 87, 8):
        src[i]
    assert list(src._handles.get("decoded", dict)) == [10]
    big = Parquet(files, columns=["x", "y"])
    for i in range(0, 87, 8):
        big[i]
    assert list(big._handles.get("decoded", dict)) == list(range(11))


def test_a_batch_over_more_row_groups_than_cache_bytes_holds_is_gathered_whole(files):
    # Shuffled batches move a process's row groups into one block per column (a pool of
    # 3 row groups here): a batch over more is gathered in parts, and a sample taken by
    # index outlives its row group's place there.
    src = Parquet(files, columns=["x", "y"], cache_bytes=3 * GROUP * (12 + 8))
    spec = infer(src[0], rows=30, index=0)
    gather = gatherer(src, spec)
    kept = None
    for seed in range(3):
        idx = np.random.default_rng(seed).permutation(87)[:30]  # over all 12 row groups
        out = [np.zeros((30,) + lf.shape, lf.dtype) for lf in spec.leaves]
        gather(idx, out)
        np.testing.assert_array_equal(out[1], idx)
        np.testing.assert_array_equal(out[0], np.stack([_expected(int(i))["x"] for i in idx]))
        assert src._pool().n == 3 and sorted(src._pool().chunk_in.tolist()) != [-1, -1, -1]
        kept = kept or src[3]
    assert not src._handles.get("decoded", dict)  # the pool holds them all
    assert isinstance(kept["y"], np.int64) and kept["y"] == 3  # a scalar, as without the pool
    np.testing.assert_array_equal(kept["x"], _expected(3)["x"])
    out = [np.zeros((30,) + lf.shape, lf.dtype) for lf in spec.leaves]
    gather(np.arange(8, 11), out)  # ordered, from the pool
    np.testing.assert_array_equal(out[1][:4], [8, 9, 10, 0])


def test_shmfeed_imports_without_the_extras_and_names_the_one_to_install():
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('pyarrow', 'fsspec', 'array_record'): sys.modules[m] = None\n"
            "import shmfeed, shmfeed.sources as s\n"
            "for make in (lambda: s.Parquet('x'), lambda: s.Arrow(None), lambda: s.ArrayRecord('x'),\n"
            "             lambda: s.ObjectCache('/tmp/x', 10)):\n"
            "    try:\n"
            "        make()\n"
            "    except shmfeed.ShmfeedError as e:\n"
            "        print(str(e).split('Install it: ')[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(shmfeed.__file__))})
    assert out.stdout.split("\n")[:4] == [
        "`pip install 'shmfeed[parquet]'`.", "`pip install 'shmfeed[parquet]'`.",
        "`pip install 'shmfeed[arrayrecord]'`.", "`pip install 'shmfeed[s3]'`."], out.stderr


def test_a_token_list_column_is_packed_through_field_like_the_same_documents_as_arrays(files):
    src = Parquet(files, columns=["tokens", "y"])
    docs = [_expected(i)["tokens"] for i in range(len(src))]
    want = shmfeed.sources.Packed(docs, length=8, window=16, seed=2)
    packed = shmfeed.sources.Packed(src, length=8, window=16, seed=2, field="tokens")
    assert len(packed) == len(want) and packed.n_tokens == sum(map(len, docs))
    with shmfeed.Loader(packed, batch_size=4, num_workers=2, shuffle=False) as loader:
        got = [{k: v.copy() for k, v in b.items()} for b in loader]
    with shmfeed.Loader(want, batch_size=4, num_workers=0, shuffle=False) as loader:
        ref = [{k: v.copy() for k, v in b.items()} for b in loader]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        for k in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(g[k], r[k])


def test_packing_a_source_of_dicts_without_field_names_the_fields(files):
    src = Parquet(files, columns=["tokens", "y"])
    with pytest.raises(shmfeed.SpecError, match=r"name the token field: `field=` one of \['tokens', 'y'\]"):
        shmfeed.sources.Packed(src, length=8)
    with pytest.raises(shmfeed.SpecError, match=r"document 0 \(dict\) has no field 'ids'.*\['tokens', 'y'\]"):
        shmfeed.sources.Packed(src, length=8, field="ids")

"""`TarShards`: WebDataset-style `.tar` shards as a `Stream`, one shard per file.

Owns: reading one tar file in order, grouping its consecutive members by key (the
member's path up to the first dot of its file name: `a/000017.jpg` and
`a/000017.json` are the fields `jpg` and `json` of sample `a/000017`), and handing each
group to the user's `decode` in the worker that reads the shard.

Invariants:
- Shard s is `paths[s]`; its samples come in the tar's member order, so a shard read
  again gives the same samples (what `Stream` needs to replace a dead worker without
  losing or repeating one: sources/_shards.py re-reads the shard up to where it stopped).
- A tar that cannot be read (truncated, corrupt) raises `SourceFileError` naming the
  shard and the last member read, in batch order; nothing is skipped silently (a bad
  header too, which tarfile alone takes for the end of the archive).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import Any

from .._errors import SpecError
from ._objstore import ObjectCache, is_url, source_paths, stamp
from ._shards import Stream
from ._sourcefiles import SourceFileError


def split_key(name: str) -> tuple[str, str]:
    """(key, field) of a member name: 'd/000017.seg.png' -> ('d/000017', 'seg.png')."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(head, stem) if head else stem), ext


class _StrictTarInfo(tarfile.TarInfo):
    """A member header that is garbage or cut short is an error: tarfile, past the
    first member, takes either for the end of the archive, and the shard's remaining
    samples would be skipped without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            raise tarfile.ReadError(f"bad member header at byte {tar.offset}: {exc}") from exc


def read_groups(path: str, name: str | None = None) -> Iterator[dict]:
    """The samples of one tar file: dicts {"__key__": key, field: bytes, ...}, in member
    order; directories and other non-files are skipped.  `name`: what errors call the
    file (its URL, when `path` is a cached copy)."""
    name = name or path
    group: dict | None = None
    last = None
    try:
        with tarfile.open(path, "r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                last = member.name
                key, field = split_key(member.name)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if group is not None and group["__key__"] != key:
                    yield group
                    group = None
                if group is None:
                    group = {"__key__": key}
                if field in group:
                    raise SourceFileError(
                        f"tar shard {name!r}: sample {key!r} has two members with field {field!r} "
                        f"(at {member.name!r}); each key's members must differ in extension.")
                group[field] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"at or just after member {last!r}" if last else "at its start"
        raise SourceFileError(
            f"tar shard {name!r}: cannot read it {where} ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt. Write it again, or leave it out of `paths`.") from exc
    if group is not None:
        yield group


class TarShards(Stream):
    """WebDataset-style tar files as a sharded stream: each file is a shard, read by
    one worker in member order; members with the same key (`000017.jpg`,
    `000017.json`, ...) form one sample, `decode({"__key__": "000017", "jpg": bytes,
    "json": bytes}) -> sample` (arrays, numbers, dicts of them) runs in the worker.

    Everything `Stream` does holds: the same batches for any `num_workers` (at most
    one worker per shard), every sample once per epoch, a dead worker replaced and its
    shard re-read to where it stopped, `shmfeed.rng()` in `decode` keyed by
    (seed, epoch, shard, position), hosts splitting the shards (`shard_count`).
    `paths`: files, glob patterns, or a list of them (`"data/train-*.tar"`); gzip-
    compressed tars (`.tar.gz`) are read too.  Remote shards (`"s3://bucket/train-*.tar"`,
    any fsspec URL) are read through `cache`, an `ObjectCache`: each is downloaded whole,
    once per machine, by the worker that reads it, and must not change during the run.
    """

    def __init__(self, paths: Any, decode: Any, *, cache: ObjectCache | None = None):
        if not callable(decode):
            raise SpecError(f"TarShards: `decode` must be a function decode(sample_fields) -> sample, "
                            f"got {type(decode).__name__}")
        self.paths = source_paths(paths, cache, "TarShards")
        self.cache = cache
        # A remote shard's version, fixed here: a shard read again is the same bytes.
        self._stamps = [stamp(p, cache) if is_url(p) else None for p in self.paths]
        self.decode = decode
        self._upcoming: list[int] = []
        super().__init__(self._read_shard, len(self.paths))

    def _shmfeed_upcoming(self, shards: list[int]) -> None:
        """The shards this worker reads after the one it opens next (ShardBuilder):
        the cache downloads the first `prefetch` of them in the background."""
        self._upcoming = shards

    def _read_shard(self, shard: int, num_shards: int) -> Iterator:
        # Not a generator itself: the upcoming shards are taken now, before another
        # shard's `make` is told its own.
        ahead = [(self.paths[s], self._stamps[s]) for s in self._upcoming if is_url(self.paths[s])]
        self._upcoming = []
        return self._samples(shard, ahead)

    def _samples(self, shard: int, ahead: list) -> Iterator:
        decode, path = self.decode, self.paths[shard]
        if not is_url(path):
            for group in read_groups(path):
                yield decode(group)
            return
        assert self.cache is not None
        with self.cache.open(path, self._stamps[shard], ahead) as obj:  # never evicted while read
            for group in read_groups(obj.path, path):
                yield decode(group)

    def __repr__(self) -> str:
        return (f"shmfeed.sources.TarShards({len(self.paths)} shards, "
                f"decode={getattr(self.decode, '__name__', self.decode)!r})")

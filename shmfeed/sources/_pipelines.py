"""Pipeline sources: `Sampled` (weighted draws with replacement), `Mix` (several sources
in fixed proportions) and `Packed` (variable-length documents packed into fixed rows).

Each is an ordinary per-sample source (`__len__`, `__getitem__`), so the Loader's order,
sharding, workers and `state_dict()` apply unchanged.  What sample i holds is a pure
function of `(seed, epoch, i)` and the source's arguments, where `seed` and `epoch` are
the Loader's, read from the key of the sample being built (`shmfeed.rng_key()`; outside
a Loader, seed 0 and epoch 0: `shmfeed.build_sample(source, i, seed=..., epoch=...)`
builds what a worker builds).  So a batch is the same whatever worker builds it, with
any `num_workers` and host count, and a resume is the Loader's few integers: these
sources keep no state of their own.

Use them with the Loader's `shuffle=False`: each orders its items itself (keyed by the
epoch), and `Mix`'s proportions hold over consecutive positions, which the Loader's
shuffle would scatter.

Memory per process: `Sampled` holds the cumulative weights (8 bytes a sample, O(1)
beyond the weights); `Mix` one period of its schedule (5 bytes a position, at most
320 KiB); `Packed` one plan of a window of
`window` documents at a time, plus one integer per window (its row count) and, for a
source of documents without `lengths`, their lengths (4 bytes each; a flat token array
has its boundaries already).
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from .. import _kernels
from .._errors import SpecError
from .._order import rng as _rng

SAMPLED_STREAM = 0x53414D50  # "SAMP": Sampled's draws
MIX_STREAM = 0x4D495820  # "MIX ": the order of a Mix's source within one pass
PACK_STREAM = 0x5041434B  # "PACK": which documents share a window, and the order of rows
_MASK64 = (1 << 64) - 1
PLANS_KEPT = 4  # windows' plans a Packed keeps per process (rows of a batch may span a few)


def _key_of() -> tuple[int, int]:
    """(seed, epoch) of the item being built (0, 0 outside a build): the Loader's, or,
    inside a `Mix`, the source's own seed and pass (see `Mix.__getitem__`)."""
    key = _rng.rng_key()
    return (0, 0) if key is None else (key[0], key[1])


def _read(source: Any, index: int, seed: int, epoch: int) -> Any:
    """`source[index]` with the item key (seed, epoch, index), the key put back after."""
    saved = _rng.rng_key()
    _rng.set_item(seed, epoch, index)
    try:
        return source[index]
    finally:
        if saved is None:
            _rng.clear_item()
        else:
            _rng.set_item(*saved)


def _hash64(*words: int) -> int:
    h = 0
    for w in words:
        h = _rng._mix64((h ^ (w & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64)
    return h


@lru_cache(maxsize=256)
def _order_key(*words: int) -> int:
    """A 64-bit permutation key (cached: SeedSequence costs ~10 us)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def _permuted(n: int, key: int, position: int) -> int:
    """Position `position` of the keyed bijection on [0, n) (the Loader's shuffle)."""
    buf = np.array([position], dtype=np.int64)
    _kernels.permute(n, key, buf, buf)
    return int(buf[0])


def _check_source(what: str, source: Any) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise SpecError(f"`{what}` must have __len__ and __getitem__, got {type(source).__name__}")
    n = len(source)
    if n == 0:
        raise SpecError(f"`{what}` is empty (len 0): there is nothing to draw from")
    return n


def _check_weights(name: str, weights: Any, n: int | None) -> np.ndarray:
    """`weights` as float64, refused (naming the first bad one) unless finite, >= 0, not
    all zero, and `n` of them when `n` is given."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"`{name}` must be a sequence of numbers, got {weights!r:.80}") from exc
    if w.ndim != 1:
        raise SpecError(f"`{name}` must be 1-D, got shape {w.shape}")
    if n is not None and len(w) != n:
        raise SpecError(f"`{name}` has {len(w)} entries, the source has {n} samples: give one weight per sample")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        i = int(bad[0])
        raise SpecError(f"`{name}[{i}]` is {float(w[i])!r}: weights must be finite and >= 0 "
                        f"({bad.size} of {len(w)} are not)")
    if not w.any():
        raise SpecError(f"`{name}` are all zero ({len(w)} of them): at least one must be > 0")
    return w


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SpecError(f"`{name}` must be an integer > 0, got {value!r}")
    return int(value)


# -- weighted sampling ---------------------------------------------------------------------
class Sampled:
    """`num_samples` (default `len(source)`) draws with replacement from `source`, sample j
    with probability `weights[j] / sum(weights)` (class balancing, curriculum).

    Draw i of an epoch is a keyed hash of `(seed, epoch, i)` mapped through the
    cumulative weights (a binary search): the same draws for any `num_workers`, resumed
    exactly.  `shmfeed.rng()` inside `source[j]` is keyed by i, so two draws of the same
    sample get different augmentations.  Memory: the cumulative weights (float64)."""

    _orders_by_epoch = True  # inside a Mix, reads its items in its own order

    def __init__(self, source: Any, weights: Any, num_samples: int | None = None):
        n = _check_source("source", source)
        w = _check_weights("weights", weights, n)
        self.source = source
        self.num_samples = n if num_samples is None else _check_positive("num_samples", num_samples)
        self._cum = np.cumsum(w)
        self._total = float(self._cum[-1])

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, index: int, *, seed: int = 0, epoch: int = 0) -> int:
        """The source index that sample `index` of `epoch` draws."""
        u = _hash64(SAMPLED_STREAM, seed, epoch, index) >> 11  # 53 random bits
        x = u * (self._total / (1 << 53))
        j = int(np.searchsorted(self._cum, x, side="right"))
        # x may round up to the total; and a zero weight is never drawn: searching to
        # the right skips the samples whose cumulative weight equals the one before.
        return min(j, len(self._cum) - 1)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} of a Sampled of {self.num_samples}")
        seed, epoch = _key_of()
        return self.source[self.draw(index, seed=seed, epoch=epoch)]


# -- mixing ---------------------------------------------------------------------------------
MIX_PERIOD_MAX = 1 << 16  # positions of a Mix's schedule before it repeats (5 bytes each)


def _integer_weights(w: np.ndarray) -> list[int]:
    """Integers in the ratios of `w`: exact when those sum to at most `MIX_PERIOD_MAX`
    (weights like 0.7/0.2/0.1 or 3:2:1), else `w` rounded to parts of `MIX_PERIOD_MAX`
    (largest remainders; a weight > 0 keeps at least 1, so that source is still drawn),
    each share then off by less than about 1/65536."""
    fr = [Fraction(float(x)).limit_denominator(1 << 32) for x in w]
    den = math.lcm(*(f.denominator for f in fr))
    ints = [int(f * den) for f in fr]
    g = math.gcd(*ints)
    ints = [x // g for x in ints]
    if sum(ints) > MIX_PERIOD_MAX:
        quotas = [Fraction(x * MIX_PERIOD_MAX, sum(ints)) for x in ints]
        ints = [max(math.floor(q), 1 if x else 0) for q, x in zip(quotas, ints)]
        short = MIX_PERIOD_MAX - sum(ints)
        for k in sorted(range(len(ints)), key=lambda k: (quotas[k] - math.floor(quotas[k]), -k), reverse=True):
            if short <= 0:
                break
            if ints[k] and quotas[k] > ints[k]:
                ints[k] += 1
                short -= 1
        g = math.gcd(*ints)
        ints = [x // g for x in ints]
    return ints


def mix_schedule(w: list[int]) -> np.ndarray:
    """One period (`sum(w)` positions) of the sources that positions draw from, for
    integer weights `w`: Tijdeman's rule (earliest deadline first).  With K sources of
    weight > 0 and sigma = 1 - 1/(2K-2), source k's (c+1)-th draw becomes eligible at
    the first position after which c+1 <= t*p_k + sigma and is due by the last after which
    c >= t*p_k - sigma (t positions done, p_k = w_k/sum(w)); each position goes to the
    eligible source with the earliest deadline, (c + sigma)/w_k, ties to the lower k.
    Tijdeman (1980) proved this never misses a deadline, so every prefix keeps every
    source within sigma of its share; after the period each source has had exactly w_k,
    so the sequence repeats."""
    live = [k for k, x in enumerate(w) if x]
    b = max(2 * len(live) - 2, 1)  # sigma = a/b
    a = b - 1 if len(live) > 1 else 0
    total = sum(w)
    count = dict.fromkeys(live, 0)
    out = np.empty(total, np.uint8 if len(w) <= 256 else np.int32)
    for t in range(1, total + 1):
        best = -1
        for k in live:
            c = count[k]
            if ((c + 1) * b - a) * total > t * w[k] * b:
                continue  # not yet eligible: it would run ahead of its share by more than sigma
            if best < 0 or (c * b + a) * w[best] < (count[best] * b + a) * w[k]:
                best = k
        if best < 0:
            raise AssertionError(f"no source eligible at position {t - 1} of weights {w}")  # Tijdeman: never
        out[t - 1] = best
        count[best] += 1
    return out


class Mix:
    """Samples drawn from several `sources` in the proportions of `weights`.

    The schedule (which source position i draws from) is a pure function of i: position
    i draws from source `table[i % P]`, where the table is one period of Tijdeman's
    earliest-deadline rule (`mix_schedule`) for the weights as integers summing to P
    (exact ratios when P <= 65536, else rounded to parts of 65536: `proportions` holds the
    shares used).  Built once at construction (P steps, ~0.2 s at P = 65536) and kept
    (5 bytes a position, at most 320 KiB); O(1) per position.  Guarantee, with K >= 2
    sources of weight > 0, p_k the share of source k and sigma = 1 - 1/(2K-2):
    the first n positions hold n*p_k +- sigma draws of source k (within 1/2 for two
    sources, 3/4 for three: less than one sample for any K), for every n; hence any
    window of consecutive positions (a batch, from any start) holds its length times p_k
    within 2*sigma < 2, and, with two sources, within less than one.  Within one over
    every window is impossible in general for K >= 3: with weights 1:2:3 the third
    source must fill every other position and the second one position in every three,
    which collide (tests/test_pipelines.py also searches 1:2:8, which cannot keep even
    |error| <= 1 for 10 positions).

    Each source is read in its own keyed order without repeats until exhausted, then
    in a new order for its next pass; passes continue across epochs (epoch e starts
    where epoch e-1 left each source).  `shuffle=None` (default): a source that orders
    itself by epoch (`Packed`, `Sampled`, `Mix`) is read in its own order, pass p as
    its epoch p, the others are shuffled; True or False: every source shuffled or not.

    An epoch is `num_samples` positions, by default the most for which no source
    repeats a sample within the first epoch: `floor(min_k len_k / p_k)` (the smallest
    source relative to its share is read exactly once; larger ones in part, the rest
    in later epochs).  Epoch e is positions e*num_samples .. (e+1)*num_samples - 1 of
    the one schedule, so the guarantee above holds across epoch boundaries too.
    `shmfeed.rng()` inside a source is keyed by the Mix position."""

    _orders_by_epoch = True  # inside a Mix, reads its items in its own order

    def __init__(self, sources: Any, weights: Any, *, num_samples: int | None = None,
                 shuffle: bool | None = None):
        sources = list(sources)
        if not sources:
            raise SpecError("`sources` is empty: give at least one source to mix")
        self.sources = sources
        self.lengths = [_check_source(f"sources[{k}]", s) for k, s in enumerate(sources)]
        w = _check_weights("weights", weights, None)
        if len(w) != len(sources):
            raise SpecError(f"`weights` has {len(w)} entries for {len(sources)} sources: give one per source")
        self.shuffle = shuffle
        # None: shuffle each source unless it orders itself by epoch (a Packed read out of
        # its order would pack a window of documents for nearly every row).
        self._shuffled = [bool(shuffle) if shuffle is not None else not getattr(type(s), "_orders_by_epoch", False)
                          for s in sources]
        self._w = _integer_weights(w)
        total = sum(self._w)
        self.proportions = [x / total for x in self._w]
        self._table = mix_schedule(self._w)
        # The draw of its source that each position of the period is (its seat).
        self._seat = np.empty(total, np.int32)
        for k, wk in enumerate(self._w):
            self._seat[self._table == k] = np.arange(wk, dtype=np.int32)
        if num_samples is None:
            num_samples = min(n * total // x for n, x in zip(self.lengths, self._w) if x)
        self.num_samples = _check_positive("num_samples", num_samples)
        # Positions each source takes per epoch: where epoch e+1 continues its passes.
        self._per_epoch = [self._seats_before(k, self.num_samples) for k in range(len(sources))]

    def __len__(self) -> int:
        return self.num_samples

    def _seats_before(self, k: int, n: int) -> int:
        """Draws of source k among the first n positions."""
        periods, rest = divmod(n, len(self._table))
        return periods * self._w[k] + int(np.count_nonzero(self._table[:rest] == k))

    def schedule(self, position: int) -> tuple[int, int]:
        """(source, seat): position `position` of the stream draws the `seat`-th sample
        of source `source`'s stream (epoch 0's numbering)."""
        periods, at = divmod(position, len(self._table))
        k = int(self._table[at])
        return k, periods * self._w[k] + int(self._seat[at])

    def locate(self, index: int, *, seed: int = 0, epoch: int = 0) -> tuple[int, int]:
        """(source, source index) that position `index` of `epoch` reads."""
        k, pos, _ = self._locate(index, seed, epoch)
        return k, pos

    def _locate(self, index: int, seed: int, epoch: int) -> tuple[int, int, int]:
        k, seat = self.schedule(index)
        count = epoch * self._per_epoch[k] + seat
        n = self.lengths[k]
        passes, pos = divmod(count, n)
        if self._shuffled[k]:
            pos = _permuted(n, _order_key(seed, k, passes, MIX_STREAM), pos)
        return k, pos, passes

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"position {index} of a Mix of {self.num_samples}")
        seed, epoch = _key_of()
        k, j, passes = self._locate(index, seed, epoch)
        # The source reads as if a Loader of its own seed ran its epoch `passes`: a
        # source that orders itself by epoch (Packed, Sampled, Mix) then gives a new
        # order each pass, and its `shmfeed.rng()` a new stream per read.
        return _read(self.sources[k], j, _hash64(MIX_STREAM, seed, k) >> 1, passes)


# -- packing --------------------------------------------------------------------------------
def pack_window(sizes: list[int], length: int) -> list[list[tuple[int, int, int]]]:
    """Rows of at most `length` tokens holding items of `sizes` (in their given order),
    each a list of (item, start, size): an item longer than `length` is cut into
    `length`-token pieces (each a row of its own) and a remainder; the remainders and
    the other items are placed best-fit decreasing (ties by order), which is within
    11/9 of the fewest rows and in practice within a row of it."""
    rows: list[list[tuple[int, int, int]]] = []
    pieces = []
    for item, size in enumerate(sizes):
        full, rest = divmod(size, length)
        for p in range(full):
            rows.append([(item, p * length, length)])
        if rest:
            pieces.append((rest, item, full * length))
    pieces.sort(key=lambda t: -t[0])  # stable: ties keep the keyed order
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for size, item, start in pieces:
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            row = len(rows)
            rows.append([])
            room = length
        else:
            room, row = free.pop(at)
        rows[row].append((item, start, size))
        if room - size:
            bisect.insort(free, (room - size, row))
    return rows


class Packed:
    """Variable-length token sequences packed into rows of `length` tokens.

    `docs` is a source whose sample is a 1-D integer array (a document), or a dict
    holding one under `field` (a `Parquet` or `Arrow` list column: `field="input_ids"`),
    or, with `boundaries` (n+1 increasing offsets, like ragged row splits), a flat token
    array whose document d is `docs[boundaries[d]:boundaries[d+1]]`.  Row i is a dict
    `{"tokens", "segment_ids", "positions"}` of `length` each (the Flax/MaxText
    convention): segment ids count the documents of the row from 1, 0 is padding
    (`pad_id` tokens); positions restart at 0 with each document.  A document longer
    than `length` is split into pieces of `length` tokens and a remainder, its pieces'
    positions continuing (a piece at 2048 starts at position 2048).

    Every document appears once per epoch.  The plan: documents are cut into windows of
    `window` consecutive documents of a keyed order fixed by `seed`, and each window is
    packed on its own, best-fit decreasing (see `pack_window`).  Its row count depends
    only on which documents it holds, so the epoch's length (`len()`) is counted once
    at construction, a window at a time, and kept as one integer per window.  Each
    epoch (`shuffle=True`) visits the windows in a new keyed order and each window's
    rows in a new keyed order; documents share rows with the same documents every
    epoch (as with a dataset packed offline: with attention masked by segment ids, which
    documents share a row does not change what the model sees; varying it per epoch
    would change the epoch's length). A worker packs a window when it first
    needs one of its rows and keeps the last few plans: memory O(`window`).

    `lengths` (one int per document) saves reading every document at construction
    when `docs` is a source of documents.  Read it in order (Loader `shuffle=False`; a
    `Mix` does): read out of order, nearly every row would pack its window again."""

    _orders_by_epoch = True  # inside a Mix, reads its items in its own order

    def __init__(self, docs: Any, length: int, *, boundaries: Any = None, lengths: Any = None,
                 window: int = 1024, shuffle: bool = True, seed: int = 0, pad_id: int = 0,
                 field: str | None = None):
        if field is not None and (boundaries is not None or not isinstance(field, str)):
            raise SpecError(f"`field` must be the name of a document's token field (a str), and only "
                            f"for a source of documents (not with `boundaries`), got {field!r}")
        self.field = field
        self.length = _check_positive("length", length)
        self.window = _check_positive("window", window)
        self.shuffle = bool(shuffle)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SpecError(f"`seed` must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.pad_id = pad_id
        self.docs = docs
        self._plans: dict[int, tuple[np.ndarray, list]] = {}  # the last few windows' plans
        self._epochs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._bounds: np.ndarray | None = None  # offsets into a flat token array
        if boundaries is not None:
            b = np.asarray(boundaries)
            tokens = np.asarray(docs) if not isinstance(docs, np.ndarray) else docs
            if b.ndim != 1 or b.dtype.kind not in "iu" or len(b) < 2:
                raise SpecError(f"`boundaries` must be n+1 >= 2 integer offsets (1-D), got shape {b.shape} "
                                f"dtype {b.dtype}")
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise SpecError(f"with `boundaries`, `docs` must be a 1-D integer token array, got shape "
                                f"{tokens.shape} dtype {tokens.dtype}")
            b = b.astype(np.int64)
            if b[0] != 0 or b[-1] != len(tokens):
                raise SpecError(f"`boundaries` must start at 0 and end at len(docs) = {len(tokens)}, "
                                f"got {int(b[0])} ... {int(b[-1])}")
            sizes = np.diff(b)
            if (sizes <= 0).any():
                d = int(np.flatnonzero(sizes <= 0)[0])
                raise SpecError(f"document {d} is empty (`boundaries[{d}]` = `boundaries[{d + 1}]` = "
                                f"{int(b[d])}) or they decrease: every document needs >= 1 token")
            self.docs, self._bounds, self._sizes = tokens, b, sizes
            self.dtype = tokens.dtype
        else:
            n = _check_source("docs", docs)
            if lengths is None:
                lengths = [len(self._read(d)) for d in range(n)]
            sizes = np.asarray(lengths)
            if sizes.shape != (n,) or sizes.dtype.kind not in "iu":
                raise SpecError(f"`lengths` must be {n} integers (one per document), got shape {sizes.shape} "
                                f"dtype {sizes.dtype}")
            if (sizes <= 0).any():
                d = int(np.flatnonzero(sizes <= 0)[0])
                raise SpecError(f"document {d} is empty (length {int(sizes[d])}): every document needs >= 1 "
                                "token; leave empty ones out of `docs`")
            self._sizes = sizes.astype(np.int32 if sizes.max() < 2**31 else np.int64)
            first = np.asarray(self._read(0))
            if first.ndim != 1 or first.dtype.kind not in "iu":
                raise SpecError(f"document 0 has shape {first.shape} dtype {first.dtype}: a document must "
                                "be a 1-D integer token array" + (
                                    ": its sample is a dict, so name the token field: `field=`"
                                    f" one of {sorted(docs[0])}" if isinstance(docs[0], dict) and self.field is None
                                    else ""))
            self.dtype = first.dtype
        self.n_docs = len(self._sizes)
        self.n_windows = -(-self.n_docs // self.window)
        self._doc_key = _order_key(self.seed, PACK_STREAM)
        counts = np.array([len(self._pack(w)[1]) for w in range(self.n_windows)], dtype=np.int64)
        self._window_rows = counts
        self.n_rows = int(counts.sum())
        self.n_tokens = int(self._sizes.sum())

    @property
    def fill(self) -> float:
        """The fraction of the rows' tokens that are document tokens (not padding)."""
        return self.n_tokens / (self.n_rows * self.length)

    def __len__(self) -> int:
        return self.n_rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": {}, "_epochs": {}}  # caches stay where they were made

    def _window_docs(self, w: int) -> np.ndarray:
        first = w * self.window
        pos = np.arange(first, min(first + self.window, self.n_docs), dtype=np.int64)
        _kernels.permute(self.n_docs, self._doc_key, pos, pos)
        return pos

    def _pack(self, w: int) -> tuple[np.ndarray, list]:
        """(documents, rows) of window w."""
        docs = self._window_docs(w)
        return docs, pack_window(self._sizes[docs].tolist(), self.length)

    def _plan(self, w: int) -> tuple[np.ndarray, list]:
        plan = self._plans.get(w)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                del self._plans[next(iter(self._plans))]
            plan = self._plans[w] = self._pack(w)
        return plan

    def _epoch_windows(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's order of windows and the cumulative rows in that order: one
        integer per window, made once per epoch in each process."""
        got = self._epochs.get((seed, epoch))
        if got is None:
            order = np.arange(self.n_windows, dtype=np.int64)
            if self.shuffle:
                _kernels.permute(self.n_windows, _order_key(seed, epoch, PACK_STREAM), order, order)
            self._epochs.clear()
            got = self._epochs[(seed, epoch)] = (order, np.cumsum(self._window_rows[order]))
        return got

    def locate(self, index: int, *, seed: int = 0, epoch: int = 0) -> tuple[int, int]:
        """(window, row of its plan) that row `index` of `epoch` holds."""
        order, ends = self._epoch_windows(seed, epoch)
        at = int(np.searchsorted(ends, index, side="right"))
        w = int(order[at])
        row = index - (int(ends[at - 1]) if at else 0)
        if self.shuffle:
            row = _permuted(int(self._window_rows[w]), _order_key(seed, epoch, w, PACK_STREAM), row)
        return w, row

    def _read(self, d: int) -> Any:
        """Document d of a source of documents: its sample, or that sample's `field`."""
        doc = self.docs[d]
        if self.field is None:
            return doc
        try:
            return doc[self.field]
        except (KeyError, TypeError, IndexError):
            raise SpecError(f"document {d} ({type(doc).__name__}) has no field {self.field!r} (`field`)"
                            + (f"; its fields: {sorted(doc)}" if isinstance(doc, dict) else "")) from None

    def _doc(self, d: int, start: int, size: int) -> np.ndarray:
        if self._bounds is not None:
            first = int(self._bounds[d]) + start
            return self.docs[first : first + size]
        doc = np.asarray(self._read(d))
        if doc.shape != (int(self._sizes[d]),):
            raise SpecError(f"document {d} has shape {doc.shape}, but its length was given as "
                            f"{int(self._sizes[d])} (`lengths`) and a document is a 1-D token array")
        return doc[start : start + size]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n_rows:
            raise IndexError(f"row {index} of a Packed of {self.n_rows}")
        seed, epoch = _key_of()
        w, row = self.locate(index, seed=seed, epoch=epoch)
        docs, plan = self._plan(w)
        tokens = np.full(self.length, self.pad_id, self.dtype)
        segments = np.zeros(self.length, np.int32)
        positions = np.zeros(self.length, np.int32)
        at = 0
        for seg, (item, start, size) in enumerate(plan[row], 1):
            tokens[at : at + size] = self._doc(int(docs[item]), start, size)
            segments[at : at + size] = seg
            positions[at : at + size] = np.arange(start, start + size, dtype=np.int32)
            at += size
        return {"tokens": tokens, "segment_ids": segments, "positions": positions}

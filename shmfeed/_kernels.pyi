# Stub of the C extension shmfeed._kernels (csrc/_kernels.c over csrc/kernels.c): hot
# loops that release the GIL.  Arrays are any buffer of the stated item type.
from typing import Any, TypeAlias

# Any object with the buffer protocol (collections.abc.Buffer needs Python 3.12).
Buffer: TypeAlias = Any

ORDER_MAX_N: int
GIL_RELEASE_MIN_COUNT: int
STREAM_MIN_BYTES: int

def stack_rows(out: Buffer, rows: tuple[Any, ...], array_type: type, format: str,
               shape: tuple[int, ...], stream: bool = ..., /) -> int: ...
def gather_rows(src: Buffer, src_stride: int, row_bytes: int, indices: Buffer, out: Buffer, /) -> None: ...
def permute(n: int, key: int, positions: Buffer, out: Buffer, /) -> None: ...
def block_permute(n: int, block: int, key: int, positions: Buffer, out: Buffer, /) -> None: ...

"""Lookups indexed by 8-bit codes, two codes at a time.

A function of an 8-bit code is a 256-entry table. ``np.take`` converts its indices to intp
first, a full pass of 8-byte writes per code; viewing two adjacent codes as one uint16 index into
a table of the 65536 code pairs halves the conversions and reads, and every value is still
``table[code]`` (bit for bit: entries move as raw bytes).
"""

from __future__ import annotations

import numpy as np

#: Wider unsigned type holding two entries of a table with entries of this many bytes.
_PAIR_TYPES = {1: np.uint16, 2: np.uint32, 4: np.uint64}


def pair_table(single: np.ndarray) -> np.ndarray:
    """The 65536-entry table of pairs of ``single`` (256 entries indexed by a code's bits):
    entry ``u`` holds the bytes of ``single[a], single[b]`` where ``a, b`` are the bytes of the
    uint16 ``u`` in memory order."""
    byte_pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    pairs = np.ascontiguousarray(single[byte_pairs])
    return pairs.view(_PAIR_TYPES[single.dtype.itemsize]).reshape(-1)


def pairs_apply(x: np.ndarray) -> bool:
    """Whether :func:`lookup_pairs` can read ``x``: 8-bit codes, contiguous, even in number."""
    return x.dtype.itemsize == 1 and x.dtype.kind in "iu" and x.size % 2 == 0 and x.flags.c_contiguous


def lookup_pairs(pairs: np.ndarray, x: np.ndarray, dtype) -> np.ndarray:
    """``single[bits of x]`` of x's shape, in ``dtype`` (that of ``single``), from its pair table."""
    return np.take(pairs, x.reshape(-1).view(np.uint16)).view(dtype).reshape(x.shape)


def code_values(dtype) -> np.ndarray:
    """The 256 codes of 8-bit ``dtype``, at the index of their bits."""
    return np.arange(256, dtype=np.uint8).view(dtype)

"""MinHash signatures and LSH band keys for captions, vectorised with numpy, free of Spark.

Bit-identical to datasketch 2.0 (`datasketch.MinHash(num_perm, seed)` updated with each shingle's
UTF-8 bytes, default scheme "affine32"; "affine64" and "legacy" are reproduced too), and band keys
equal to the bucket keys of `datasketch.MinHashLSH(threshold, num_perm)`. Parity is the point: a
reviewer can check any row, pair or cluster against the reference library in a few lines.

    normalise_caption(text)               NFKC, casefold, whitespace collapsed, stripped
    shingles(text, kind, n)               word or character n-grams of the normalised text
    minhash_signatures(lists, num_perm)   (rows, num_perm) array, one row per shingle list
    lsh_params(threshold, num_perm)       (bands, rows) = datasketch's _optimal_param
    band_keys(signatures, bands, rows)    the bytes datasketch uses as bucket keys, per band

Empty text: `shingles` returns no shingles and `minhash_signatures` flags the row as having no
signature (`has_signature` False). datasketch would give such a set the all-max signature, which
falls into the same bucket as every other empty set: all empty captions would be "duplicates" of
each other. Callers give those rows no signature instead (a null in Spark).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

SCHEMES = ("affine32", "affine64", "legacy")
DEFAULT_SEED = 1  # datasketch.MinHash's default, so signatures equal a plain MinHash(num_perm)

_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH32 = np.uint64((1 << 32) - 1)
_WHITESPACE = re.compile(r"\s+")
# Shingles hashed per chunk: bounds the (shingles x num_perm) permutation matrix (~32 MB at 128).
_CHUNK_SHINGLES = 65_536


def normalise_caption(text: str | None) -> str:
    """NFKC, casefold, every run of whitespace one space, stripped. None gives ""."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", text).strip()


def shingles(text: str | None, kind: str = "word", n: int = 3) -> list[str]:
    """The distinct shingles of the normalised text, in order of first appearance.

    word: n consecutive words joined by one space; char: n consecutive code points (spaces
    included). A text shorter than n is one shingle, the whole text, so a short caption is still
    hashed. An empty (or all-whitespace) text gives no shingles.
    """
    if n < 1:
        raise ValueError(f"shingle size must be at least 1, got {n}")
    if kind not in ("word", "char"):
        raise ValueError(f"shingle kind must be 'word' or 'char', got {kind!r}")
    text = normalise_caption(text)
    if not text:
        return []
    if kind == "word":
        units = text.split(" ")
        if len(units) <= n:
            return [text]
        grams = [" ".join(units[i:i + n]) for i in range(len(units) - n + 1)]
    else:
        if len(text) <= n:
            return [text]
        grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return list(dict.fromkeys(grams))


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"MinHash scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def signature_dtype(scheme: str = "affine32"):
    """uint32 for affine32 (as datasketch 2.0 stores it), uint64 otherwise."""
    _check_scheme(scheme)
    return np.uint32 if scheme == "affine32" else np.uint64


@functools.lru_cache(maxsize=32)
def permutations(num_perm: int, seed: int = DEFAULT_SEED, scheme: str = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the num_perm permutations, drawn exactly as datasketch draws them."""
    _check_scheme(scheme)
    if num_perm < 1:
        raise ValueError("num_perm must be positive")
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        # One (a, b) pair per permutation from the 61-bit Mersenne prime range, interleaved.
        pairs = [(gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64))
                 for _ in range(num_perm)]
        ab = np.array(pairs, dtype=np.uint64).T
        a, b = ab[0], ab[1]
    else:
        width = 32 if scheme == "affine32" else 64
        dtype = signature_dtype(scheme)
        a = gen.randint(0, 1 << (width - 1), num_perm, dtype=dtype) * dtype(2) + dtype(1)  # odd: a bijection
        b = gen.randint(0, 1 << width, num_perm, dtype=dtype)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch pre-mixes every input hash with it)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _shingle_hashes(shingle_lists: Sequence[Iterable], width: int) -> tuple[np.ndarray, np.ndarray]:
    """SHA-1 of every shingle (its first 4 or 8 bytes, little-endian: datasketch's sha1_hash32/64),
    flattened, and the number of shingles per row. Each distinct shingle is hashed once per call:
    templated alt-texts repeat the same shingles across many rows."""
    rows = [row if isinstance(row, list) else list(row) for row in shingle_lists]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = list(itertools.chain.from_iterable(rows))
    nbytes, sha1 = width // 8, hashlib.sha1
    # surrogatepass: a lone surrogate (text decoded with surrogateescape) is hashed, not a crash.
    digest = {s: sha1(s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")).digest()[:nbytes]
              for s in dict.fromkeys(flat)}
    hashes = np.frombuffer(b"".join([digest[s] for s in flat]), dtype="<u4" if width == 32 else "<u8")
    return hashes.astype(np.uint32 if width == 32 else np.uint64), counts


def _permute(hv: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: str) -> np.ndarray:
    """(num_perm, shingles) permuted hash values, with datasketch's wrap-around arithmetic.
    Permutations along the first axis: the per-row minimum then reduces along contiguous memory."""
    if scheme == "legacy":
        hv = hv.astype(np.uint64)[None, :]
        return np.bitwise_and((hv * a[:, None] + b[:, None]) % _MERSENNE_PRIME, _MAX_HASH32)
    hv = _fmix32(hv) if scheme == "affine32" else _fmix64(hv)
    return a[:, None] * hv[None, :] + b[:, None]


def minhash_signatures(shingle_lists: Sequence[Iterable], num_perm: int = 128, seed: int = DEFAULT_SEED,
                       scheme: str = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """(signatures, has_signature) for a batch of rows, each row an iterable of shingles (str, hashed
    as UTF-8, or bytes).

    signatures: (rows, num_perm), uint32 for affine32 (datasketch 2.0's default) else uint64; row i
    equals `datasketch.MinHash(num_perm, seed, scheme=scheme)` updated with row i's shingles.
    has_signature: False for a row with no shingles; its signature row holds datasketch's empty
    value (all max), which callers must not put into LSH buckets.
    """
    _check_scheme(scheme)
    width = 64 if scheme == "affine64" else 32
    a, b = permutations(num_perm, seed, scheme)
    dtype = signature_dtype(scheme)
    empty = _MAX_HASH32 if scheme == "legacy" else np.iinfo(dtype).max
    hashes, counts = _shingle_hashes(shingle_lists, width)
    n = len(counts)
    signatures = np.full((n, num_perm), empty, dtype=dtype)
    has_signature = counts > 0
    ends = np.cumsum(counts)
    starts = ends - counts
    row = 0
    while row < n:
        # Rows [row, stop) whose shingles fit one chunk (at least one row, however long).
        stop = max(int(np.searchsorted(ends, starts[row] + _CHUNK_SHINGLES, side="right")), row + 1)
        rows = row + np.flatnonzero(has_signature[row:stop])
        if len(rows):
            lo, hi = int(starts[row]), int(ends[stop - 1])
            permuted = _permute(hashes[lo:hi], a, b, scheme)
            # reduceat over the start of each non-empty row: empty rows have no shingles in between.
            signatures[rows] = np.minimum.reduceat(permuted, starts[rows] - lo, axis=1).T
        row = stop
    return signatures, has_signature


def _false_positive(threshold: float, bands: int, rows: int) -> float:
    from scipy.integrate import quad
    return quad(lambda s: 1 - (1 - s ** float(rows)) ** float(bands), 0.0, threshold)[0]


def _false_negative(threshold: float, bands: int, rows: int) -> float:
    from scipy.integrate import quad
    return quad(lambda s: 1 - (1 - (1 - s ** float(rows)) ** float(bands)), threshold, 1.0)[0]


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative areas under the
    S-curve, by the grid search of datasketch's `_optimal_param` (first minimum wins), so the LSH
    here buckets exactly as `MinHashLSH(threshold, num_perm, weights)` does."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be at least 2, got {num_perm}")
    fp_weight, fn_weight = weights
    best, best_error = (0, 0), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            error = (_false_positive(threshold, bands, rows) * fp_weight
                     + _false_negative(threshold, bands, rows) * fn_weight)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands, rows * itemsize) uint8: band i of a row is its hash values [i*rows, (i+1)*rows)
    as big-endian bytes, which is exactly the key MinHashLSH files that band's bucket under
    (`bytes(hashvalues[start:end].byteswap().data)` on a little-endian machine): two rows share a
    bucket of band i iff `keys[x, i].tobytes() == keys[y, i].tobytes()`. Values past bands*rows
    are unused, as in datasketch."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm {signatures.shape[1]}")
    big_endian = np.ascontiguousarray(signatures[:, :bands * rows], dtype=signatures.dtype.newbyteorder(">"))
    return big_endian.view(np.uint8).reshape(len(signatures), bands, rows * signatures.dtype.itemsize)

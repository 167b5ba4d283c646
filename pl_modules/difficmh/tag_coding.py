"""Image tags as lossless side information (Diff-ICMH's tag guidance).

A tag set is a subset of a fixed vocabulary of V names, and its order carries nothing, so it is
coded as a k-subset: k with Elias-γ (of k + 1, so that the empty set costs one bit), then the
subset's rank among all C(V, k) subsets of that size (the combinatorial number system) in
⌈log2 C(V, k)⌉ bits. Fixed-length indices spend k·⌈log2 V⌉ bits: they also code the order, worth
log2 k! bits that nobody reads, and round each index up to whole bits; the paper's code spends 13
bits per tag (V = 4,585). For one or two tags the count's γ code costs more than that saves. The
bits are padded to whole bytes, which is what the file holds.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path


class TagError(ValueError):
    """A tag the vocabulary does not have, or a tag payload that does not decode."""


class Vocabulary:
    """Tag names in a fixed order; its digest names it, so a decoder can tell it has the encoder's."""

    def __init__(self, names: list[str], source: str = "<list>"):
        seen: dict[str, int] = {}
        for name in names:
            if name in seen:
                raise TagError(f"tag vocabulary {source} lists '{name}' twice")
            seen[name] = len(seen)
        if not seen:
            raise TagError(f"tag vocabulary {source} is empty")
        self.names, self.index, self.source = list(names), seen, source

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        """One tag per line; blank lines and lines starting with # are skipped."""
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        return cls([line for line in lines if line and not line.startswith("#")], str(path))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode("utf-8")).hexdigest()

    def indices(self, tags: list[str]) -> list[int]:
        """Sorted indices of a tag set; a tag outside the vocabulary is refused, naming it."""
        unknown = [t for t in tags if t not in self.index]
        if unknown:
            raise TagError(f"tag '{unknown[0]}' is not in the vocabulary {self.source} ({len(self)} tags)")
        return sorted({self.index[t] for t in tags})


def subset_rank(indices: list[int]) -> int:
    """Rank of a sorted set of distinct indices among all subsets of its size: Σ C(c_i, i + 1)."""
    return sum(math.comb(c, i + 1) for i, c in enumerate(indices))


def subset_unrank(rank: int, k: int) -> list[int]:
    """The sorted k-subset of that rank (the inverse of :func:`subset_rank`)."""
    indices = []
    for size in range(k, 0, -1):
        c = size - 1
        while math.comb(c + 1, size) <= rank:
            c += 1
        indices.append(c)
        rank -= math.comb(c, size)
    return indices[::-1]


def rank_bits(vocabulary_size: int, k: int) -> int:
    """⌈log2 C(V, k)⌉: the bits that tell one k-subset from every other."""
    return (math.comb(vocabulary_size, k) - 1).bit_length()


def gamma_bits(n: int) -> int:
    """Length of Elias-γ(n), n ≥ 1: 2⌊log2 n⌋ + 1."""
    return 2 * (n.bit_length() - 1) + 1


def tag_set_bits(vocabulary_size: int, k: int) -> int:
    """Bits of a k-tag set before byte padding: Elias-γ(k + 1) plus the subset's rank."""
    return gamma_bits(k + 1) + rank_bits(vocabulary_size, k)


def fixed_length_bits(vocabulary_size: int, k: int) -> int:
    """k·⌈log2 V⌉: each tag as a fixed-length index (not counting how k is sent)."""
    return k * (vocabulary_size - 1).bit_length()


def fixed_length_stored_bits(vocabulary_size: int, k: int) -> int:
    """Fixed-length indices as a file would hold them: k sent the same way (Elias-γ(k + 1)), padded to
    bytes — the like-for-like comparison with ``encode_tags``, whose only difference is the subset rank."""
    return 8 * math.ceil((gamma_bits(k + 1) + fixed_length_bits(vocabulary_size, k)) / 8)


def encode_tags(tags: list[str], vocabulary: Vocabulary) -> bytes:
    indices = vocabulary.indices(tags)
    k = len(indices)
    n = k + 1
    bits = "0" * (n.bit_length() - 1) + format(n, "b")
    width = rank_bits(len(vocabulary), k)
    if width:
        bits += format(subset_rank(indices), f"0{width}b")
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def decode_tags(payload: bytes, vocabulary: Vocabulary) -> list[str]:
    """The tag set (in vocabulary order) a payload of :func:`encode_tags` holds; anything else
    (a wrong length, a rank out of range, padding that is not zero) is refused."""
    bits = "".join(format(byte, "08b") for byte in payload)
    zeros = len(bits) - len(bits.lstrip("0"))
    if zeros == len(bits) or 2 * zeros + 1 > len(bits):
        raise TagError("tag section does not decode (no tag count)")
    start = 2 * zeros + 1
    k = int(bits[zeros:start], 2) - 1
    if k > len(vocabulary):
        raise TagError(f"tag section does not decode (claims {k} tags of a {len(vocabulary)}-tag vocabulary)")
    end = start + rank_bits(len(vocabulary), k)
    rank = int(bits[start:end] or "0", 2)
    if len(payload) != math.ceil(end / 8) or rank >= math.comb(len(vocabulary), k) or "1" in bits[end:]:
        raise TagError(f"tag section does not decode ({len(payload)} bytes do not hold {k} tags of this vocabulary)")
    return [vocabulary.names[i] for i in subset_unrank(rank, k)]

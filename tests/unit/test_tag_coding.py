"""Tags coded losslessly as a k-subset of the vocabulary: exact round trips, bit counts that equal
the formula, the empty set, and one-line refusals."""
import math
import random
from pathlib import Path

import pytest

from conftest import ROOT
from pl_modules.difficmh.tag_coding import (TagError, Vocabulary, decode_tags, encode_tags, fixed_length_bits,
                                            fixed_length_stored_bits, rank_bits, subset_rank, subset_unrank,
                                            tag_set_bits)

pytestmark = pytest.mark.unit


def test_subset_ranks_are_the_combinatorial_number_system_by_hand():
    assert subset_rank([0, 1, 2]) == 0  # the first 3-subset
    assert subset_rank([3]) == 3
    assert subset_rank([1, 3]) == 1 + 3  # C(1,1) + C(3,2)
    # every 2-subset of 5 gets a distinct rank in 0..C(5,2)-1, and unranks back
    pairs = [[a, b] for b in range(5) for a in range(b)]
    assert sorted(subset_rank(p) for p in pairs) == list(range(math.comb(5, 2)))
    assert all(subset_unrank(subset_rank(p), 2) == p for p in pairs)


def test_payloads_by_hand():
    vocabulary = Vocabulary([f"t{i}" for i in range(80)])
    assert encode_tags([], vocabulary) == bytes([0b1000_0000])  # γ(1) = 1, no rank bits
    # γ(2) = 010, then rank 3 in ⌈log2 80⌉ = 7 bits = 0000011, padded with zeros
    assert encode_tags(["t3"], vocabulary) == bytes([0b0100_0000, 0b1100_0000])
    assert decode_tags(bytes([0b0100_0000, 0b1100_0000]), vocabulary) == ["t3"]
    assert decode_tags(bytes([0b1000_0000]), vocabulary) == []


@pytest.mark.parametrize("size,ks", [(80, [0, 1, 2, 5, 40, 80]), (4585, [0, 1, 3, 10, 30])])
def test_random_sets_round_trip_in_exactly_the_formulas_bytes(size, ks):
    vocabulary = Vocabulary([f"tag {i}" for i in range(size)])
    rng = random.Random(0)
    for k in ks:
        for _ in range(20):
            tags = rng.sample(vocabulary.names, k)
            payload = encode_tags(tags, vocabulary)
            assert decode_tags(payload, vocabulary) == sorted(tags, key=vocabulary.index.get)
            assert len(payload) == math.ceil(tag_set_bits(size, k) / 8)
        gamma = 2 * math.floor(math.log2(k + 1)) + 1
        assert tag_set_bits(size, k) == gamma + (math.ceil(math.log2(math.comb(size, k))) if k not in (0, size) else 0)


def test_subset_coding_saves_the_order_and_the_rounding_of_fixed_length_indices():
    # 10 tags of RAM++'s 4,585: 130 bits as 13-bit indices, ⌈log2 C(4585, 10)⌉ = 100 bits as a set;
    # the 30 saved are log2 10! (the order, 21.8) plus 10·(13 − log2 4585) (the rounding, 8.4)
    assert fixed_length_bits(4585, 10) == 130
    assert rank_bits(4585, 10) == 100
    saved = math.log2(math.factorial(10)) + 10 * (13 - math.log2(4585))
    assert fixed_length_bits(4585, 10) - rank_bits(4585, 10) == pytest.approx(saved, abs=1)


def test_fixed_length_indices_stored_alike_never_cost_less_than_the_subset_code():
    # COCO-80, by hand: γ(k + 1) + 7k bits padded to bytes: k=0 → 1 → 8, k=1 → 10 → 16, k=2 → 17 → 24, k=3 → 26 → 32
    assert [fixed_length_stored_bits(80, k) for k in range(4)] == [8, 16, 24, 32]
    for size in (80, 4585):
        for k in range(21):
            subset = 8 * math.ceil(tag_set_bits(size, k) / 8)
            assert subset <= fixed_length_stored_bits(size, k)  # the same count code; C(V, k) ≤ V^k


def test_a_tag_outside_the_vocabulary_is_refused_in_one_line():
    vocabulary = Vocabulary.from_file(ROOT / "configs/tags/coco-80.txt")
    assert len(vocabulary) == 80 and vocabulary.names[:2] == ["person", "bicycle"]
    with pytest.raises(TagError, match=r"^tag 'lighthouse' is not in the vocabulary .*coco-80.txt \(80 tags\)$"):
        encode_tags(["person", "lighthouse"], vocabulary)
    with pytest.raises(TagError, match="lists 'a' twice"):
        Vocabulary(["a", "b", "a"])


@pytest.mark.parametrize("payload", [b"", b"\x00", bytes([0b0100_0000, 0b1100_0001]), bytes([0b1000_0000, 0]),
                                     bytes([0b0000_0001, 0xFF])])
def test_a_damaged_payload_is_refused_not_decoded_into_other_tags(payload):
    with pytest.raises(TagError, match="tag section does not decode"):
        decode_tags(payload, Vocabulary([f"t{i}" for i in range(80)]))


def test_tag_bits_counts_a_real_folders_tag_sets_as_the_file_holds_them(tmp_path, capsys):
    import json
    import subprocess
    import sys

    out = tmp_path / "bits.json"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "tag-bits", "images=[../shared/data/kodak]", "max_images=3",
                    "tagger.model=tiny-clip", "tagger.top_k=2", "tagger.threshold=0", f"out_json={out}"],
                   check=True, cwd=ROOT, capture_output=True)
    summary = json.loads(out.read_text())["summary"][0]
    assert summary["images"] == 3 and summary["tags_per_image"] == 2
    # γ(3) = 3 bits and ⌈log2 C(80, 2)⌉ = 12 bits, padded to 2 bytes; 2 × 7-bit indices, and with γ(3)
    # padded: 17 bits → 3 bytes; 2 × 13 bits
    assert (summary["subset_bits_per_image"], summary["fixed_bits_per_image"], summary["fixed_stored_bits_per_image"],
            summary["paper_bits_per_image"]) == (16, 14, 24, 26)

import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from pl_modules.core.bitstream import MAGIC, Bitstream, BitstreamError, Sampler, _varint, check_geometry, pack, unpack
from pl_modules.core.codecs import build_codec

pytestmark = pytest.mark.unit

ID = "ab" * 32
V1 = ROOT / "tests" / "fixtures" / "container-v1"
"""Written by the code before format 2 (commit 9eb5520): a tiny trained stage-1 final, a 70×50 crop
of kodim23, its format-1 bitstream and the image that code decoded from it."""


def sample_stream(**changes) -> Bitstream:
    fields = dict(decoder_id=ID, height=512, width=768, latent_shape=(8, 12),
                  strings=[[bytes(range(256)) * 3], [b"\x00\x01\x02"]], codec="bmshj2018-hyperprior")
    return Bitstream(**{**fields, **changes})


def test_pack_unpack_round_trips_every_field():
    stream = sample_stream(sampler=Sampler(steps=4, seed=123456789, guidance=5.0), tags=b"\x07\x01")
    assert unpack(pack(stream)) == stream
    assert unpack(pack(sample_stream())) == sample_stream()


def test_size_is_payload_plus_a_small_header():
    data = pack(sample_stream())
    payload = 768 + 3
    # magic 4, version 1, id 32, sizes 2+2, sections 1, codec section (name 1+5, flags 1, length 1,
    # "bmshj2018-hyperprior" 20), latents section (name 1+7, flags 1, length 2; dims 1+1+1, groups 1,
    # (count 1 + length 2) + (count 1 + length 1)), CRC 4
    assert len(data) == payload + 4 + 1 + 32 + 4 + 1 + 28 + 11 + 3 + 1 + (1 + 2) + (1 + 1) + 4
    assert sample_stream().bits_per_pixel() == pytest.approx(8 * len(data) / (512 * 768))


def test_varint_matches_leb128():
    assert _varint(0) == b"\x00"
    assert _varint(127) == b"\x7f"
    assert _varint(300) == b"\xac\x02"


@pytest.mark.parametrize("cut", [1, 5, 40, 100])
def test_truncated_file_fails_with_one_line(cut):
    data = pack(sample_stream())
    with pytest.raises(BitstreamError, match="truncated|corrupt|magic") as err:
        unpack(data[:-cut])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("position", [4, 10, 60, 300, -5])
def test_any_flipped_bit_is_detected(position):
    data = bytearray(pack(sample_stream()))
    data[position] ^= 0x10
    with pytest.raises(BitstreamError, match="corrupt|CRC"):
        unpack(bytes(data))


def test_foreign_file_is_refused():
    with pytest.raises(BitstreamError, match="magic"):
        unpack(b"\x89PNG\r\n\x1a\n" + bytes(100))


def with_section(name: str, payload: bytes, optional: bool) -> bytes:
    """A valid file (fresh CRC) with one more section, as a newer writer would make it."""
    body = bytearray(pack(sample_stream())[:-4])
    count_at = len(MAGIC) + 1 + 32 + len(_varint(512)) + len(_varint(768))
    body[count_at] += 1
    body += struct.pack("<B", len(name)) + name.encode() + struct.pack("<B", int(optional)) + _varint(len(payload))
    body += payload
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def test_an_unknown_section_is_refused_unless_marked_optional():
    with pytest.raises(BitstreamError, match="required section 'future'"):
        unpack(with_section("future", b"xyz", optional=False))
    stream = unpack(with_section("future", b"xyz", optional=True))
    assert stream.unknown_optional == ["future"] and stream.strings == sample_stream().strings


def forged(height: int, width: int, latent_shape: tuple[int, int], codec: str = "bmshj2018-hyperprior",
           strings: list[list[bytes]] | None = None) -> bytes:
    """A header that lies, with a valid CRC."""
    return pack(sample_stream(height=height, width=width, latent_shape=latent_shape, codec=codec,
                              **({"strings": strings} if strings is not None else {})))


def test_more_strings_than_the_codec_codes_are_refused_and_so_is_a_negative_seed():
    codec = build_codec("bmshj2018-hyperprior", 16, 24)
    with pytest.raises(BitstreamError, match=r"holds \[1000000, 1\] strings per entropy model"):
        check_geometry(codec, unpack(forged(512, 768, (8, 12), strings=[[b""] * 1_000_000, [b"z"]])))
    with pytest.raises(BitstreamError, match="seed in 0..2"):
        Sampler(steps=4, seed=-1)


def test_an_image_larger_than_max_pixels_is_refused_before_any_decoding():
    with pytest.raises(BitstreamError, match="60000x60000 image, outside 1..268435456 pixels"):
        unpack(forged(60000, 60000, (938, 938)))
    with pytest.raises(BitstreamError, match="max_pixels"):
        unpack(forged(512, 768, (8, 12)), max_pixels=512 * 767)
    assert unpack(forged(512, 768, (8, 12)), max_pixels=512 * 768).height == 512


def test_a_latent_shape_that_does_not_fit_the_image_and_codec_is_refused():
    codec = build_codec("bmshj2018-hyperprior", 16, 24)
    check_geometry(codec, unpack(forged(500, 700, (8, 11))))  # 500×700 pads to 512×704: z is 8×11
    with pytest.raises(BitstreamError, match=r"latent shape \(30000, 30000\) does not fit a 768x512 image"):
        check_geometry(codec, unpack(forged(512, 768, (30000, 30000))))
    factorized = build_codec("bmshj2018-factorized", 16, 24)  # pads to 16, codes y at 1/16
    check_geometry(factorized, unpack(forged(500, 700, (32, 44), codec="bmshj2018-factorized", strings=[[b"y"]])))
    with pytest.raises(BitstreamError, match="holds a bmshj2018-hyperprior codec's latents"):
        check_geometry(factorized, unpack(forged(500, 700, (32, 44))))


REFUSE = """
import resource, sys
sys.path.insert(0, {root!r})
from pl_modules.codec_io import decompress_file
from pl_modules.core.bitstream import BitstreamError
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decompress_file({path!r}, {out!r}, {model!r})
    print("decoded")
except BitstreamError as err:
    print("refused:", err)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - imported)
"""


@pytest.mark.parametrize("height, width, latent", [(512, 768, (30000, 30000)), (60000, 60000, (938, 938))],
                         ids=["huge-latent", "huge-image"])
def test_decompress_refuses_a_forged_header_in_one_line_with_bounded_memory(tmp_path, height, width, latent):
    from pl_modules.finals import decoder_id, load_final

    final = load_final(V1 / "stage1-final")
    path = tmp_path / "forged.bin"
    path.write_bytes(pack(sample_stream(decoder_id=decoder_id(final.manifest), height=height, width=width,
                                        latent_shape=latent)))
    script = REFUSE.format(root=str(ROOT), path=str(path), out=str(tmp_path / "x.png"), model=str(V1 / "stage1-final"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and len(lines) == 2, result.stdout + result.stderr
    # Measured past the imports, whose footprint is the machine's (0.9 GiB here, 1.8 GiB on CI), not the file's.
    grown_mib = int(lines[1]) / 1024
    assert grown_mib < 200, grown_mib  # a tiny codec's load; decoding would want ~230 GB
    assert not (tmp_path / "x.png").exists()


def test_a_format_1_file_written_by_the_old_code_still_decodes_to_the_same_pixels(tmp_path):
    from pl_modules.codec_io import decompress_file

    stream = unpack((V1 / "image.v1.bin").read_bytes())
    assert stream.version == 1 and (stream.width, stream.height) == (70, 50)
    decompress_file(V1 / "image.v1.bin", tmp_path / "decoded.png", V1 / "stage1-final")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "decoded.png")), np.asarray(Image.open(V1 / "decoded.png")))
    # Found by the codec weights' hash, as format 1 names its model.
    shutil.copytree(V1 / "stage1-final", tmp_path / "runs" / "old" / "stage1" / "final")
    decompress_file(V1 / "image.v1.bin", tmp_path / "found.png", search_roots=(tmp_path / "runs",))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "found.png")), np.asarray(Image.open(V1 / "decoded.png")))


def test_decompress_finds_one_decoder_and_refuses_none_or_several(tmp_path):
    import json

    from pl_modules.codec_io import find_model

    def final(name: str, weights: dict) -> None:
        folder = tmp_path / name / "stage1" / "final"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"stage": "stage1", "weights": weights, "params": {},
                                                          "format_version": 2}))

    final("a", {"codec.safetensors": "11" * 32})
    final("copy-of-a", {"codec.safetensors": "11" * 32})
    old = Bitstream("11" * 32, 8, 8, (1, 1), [], version=1)
    assert find_model(old, (tmp_path,)).parts[-3] == "a"  # copies of one decoder are one decoder
    with pytest.raises(BitstreamError, match="no decoder 222222222222… under"):
        find_model(Bitstream("22" * 32, 8, 8, (1, 1), [], version=1), (tmp_path,))
    final("b", {"codec.safetensors": "11" * 32, "extra.safetensors": "33" * 32})  # same codec, another decoder
    with pytest.raises(BitstreamError, match="2 different decoders under .* match 111111111111…"):
        find_model(old, (tmp_path,))

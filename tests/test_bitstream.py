import pytest

from pl_modules.bitstream import Bitstream, BitstreamError, _varint, pack, unpack

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def sample_stream() -> Bitstream:
    return Bitstream(SHA, height=512, width=768, latent_shape=(8, 12),
                     strings=[[bytes(range(256)) * 3], [b"\x00\x01\x02"]])


def test_pack_unpack_round_trips_every_field():
    stream = sample_stream()
    assert unpack(pack(stream)) == stream


def test_size_is_payload_plus_a_small_fixed_header():
    data = pack(sample_stream())
    payload = 768 + 3
    # magic 4, version 1, sha 32, size 8, dims 1+1+1, groups 1, (count 1 + length 2) + (count 1 + length 1), CRC 4
    assert len(data) == payload + 4 + 1 + 32 + 8 + 3 + 1 + 3 + 2 + 4
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

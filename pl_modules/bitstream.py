"""The file a codec writes: every byte of it counts in bpp, and a damaged or foreign file is
refused with one line rather than decoded into a wrong image.

Layout (integers little-endian, lengths as LEB128 varints)::

    magic "DCDC" | format u8 | model sha256 (32 B) | height u32 | width u32
    | latent dims u8, each varint | groups u8 | per group: strings u8, per string: length, bytes
    | CRC32 u32 of everything before it
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pl_modules.codecs import PAD_MULTIPLE

MAGIC = b"DCDC"
FORMAT_VERSION = 1


class BitstreamError(ValueError):
    """A file that is not a complete, intact bitstream for the given model."""


@dataclass
class Bitstream:
    model_sha256: str
    height: int
    width: int
    latent_shape: tuple[int, ...]
    strings: list[list[bytes]]

    def bits_per_pixel(self) -> float:
        return 8 * len(pack(self)) / (self.height * self.width)


def pack(stream: Bitstream) -> bytes:
    out = bytearray(MAGIC)
    out += struct.pack("<B", FORMAT_VERSION)
    out += bytes.fromhex(stream.model_sha256)
    out += struct.pack("<II", stream.height, stream.width)
    out += struct.pack("<B", len(stream.latent_shape))
    for dim in stream.latent_shape:
        out += _varint(dim)
    out += struct.pack("<B", len(stream.strings))
    for group in stream.strings:
        out += struct.pack("<B", len(group))
        for string in group:
            out += _varint(len(string)) + string
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def unpack(data: bytes) -> Bitstream:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a bitstream of this codec (bad magic bytes)")
    if len(data) < len(MAGIC) + 1 + 32 + 8 + 4:
        raise BitstreamError("bitstream is truncated (shorter than its header)")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream is corrupt or truncated (CRC32 mismatch)")
    reader = _Reader(body, len(MAGIC))
    version = reader.fixed("<B")
    if version != FORMAT_VERSION:
        raise BitstreamError(f"bitstream format {version} is not supported (this code reads {FORMAT_VERSION})")
    sha = reader.take(32).hex()
    height, width = reader.fixed("<I"), reader.fixed("<I")
    latent_shape = tuple(reader.varint() for _ in range(reader.fixed("<B")))
    strings = [[reader.take(reader.varint()) for _ in range(reader.fixed("<B"))] for _ in range(reader.fixed("<B"))]
    if reader.pos != len(body):
        raise BitstreamError("bitstream has trailing bytes after its last stream")
    return Bitstream(sha, height, width, latent_shape, strings)


@torch.no_grad()
def encode_image(model, x: torch.Tensor, model_sha256: str) -> Bitstream:
    """Entropy-code one image (1×3×H×W in [0, 1]); the model must have run ``update(force=True)``."""
    height, width = x.shape[-2:]
    out = model.compress(pad_to_multiple(x))
    strings = [[bytes(s) for s in group] for group in out["strings"]]
    return Bitstream(model_sha256, height, width, tuple(int(d) for d in out["shape"]), strings)


@torch.no_grad()
def decode_image(model, stream: Bitstream, model_sha256: str) -> torch.Tensor:
    """The 8-bit image the file holds (as floats in [0, 1]), cropped to the original size."""
    if stream.model_sha256 != model_sha256:
        raise BitstreamError(f"bitstream was made by model {stream.model_sha256[:12]}…, not by this model "
                             f"({model_sha256[:12]}…)")
    x_hat = model.decompress(stream.strings, list(stream.latent_shape))["x_hat"]
    return quantize_8bit(x_hat[..., : stream.height, : stream.width])


def round_trip(model, x: torch.Tensor, model_sha256: str) -> tuple[bytes, torch.Tensor]:
    """(the file's bytes, the image decoded from those bytes): what evaluation measures."""
    data = pack(encode_image(model, x, model_sha256))
    return data, decode_image(model, unpack(data), model_sha256)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Replicate-pad bottom/right: cheaper to code than zeros, and cropped away after decoding."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BitstreamError("bitstream is truncated (a stream runs past the end of the file)")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def fixed(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise BitstreamError("bitstream is corrupt (a length field is too long)")

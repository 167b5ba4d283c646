"""The file a codec writes: every byte of it counts in bpp, and a damaged, foreign or implausible
file is refused with one line rather than decoded into a wrong image or an allocation that kills
the process.

Format 2 (integers little-endian, lengths and sizes as LEB128 varints)::

    magic "DCDC" | format u8 = 2 | decoder id (32 B) | height | width | sections
    | per section: name length u8, name (ASCII) | flags u8 (bit 0: optional) | length | payload
    | CRC32 u32 of everything before it

Sections: ``codec`` (the codec's architecture), ``latents`` (the latent shape and the entropy-coded
strings, one group per entropy model), ``sampler`` (steps, seed and guidance scale of a diffusion
decoder), ``tags`` (losslessly coded side information). A reader refuses a section it does not know
unless the writer marked it optional. The decoder id names the whole decoder (every trained weight
it decodes with), not only the codec's weights. Format-1 files (magic | 1 | codec weights sha256 |
height u32 | width u32 | latent dims | string groups | CRC32) still decode.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

MAGIC = b"DCDC"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SECTIONS = ("codec", "latents", "sampler", "tags")
OPTIONAL = 1
DEFAULT_MAX_PIXELS = 1 << 28
"""16384 × 16384: a header claiming more is refused before anything is allocated."""
# Format 1 padded every codec's input to this multiple.
V1_PAD_MULTIPLE = 64


class BitstreamError(ValueError):
    """A file that is not a complete, intact, plausible bitstream for the given model."""


@dataclass(frozen=True)
class Sampler:
    """How a diffusion decoder samples: the reconstruction is a function of the bits and these."""

    steps: int
    seed: int
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if not (1 <= self.steps < 2**16 and 0 <= self.seed < 2**63):
            raise BitstreamError(f"sampler steps must be in 1..65535 and seed in 0..2^63-1, got {self.steps}, {self.seed}")


@dataclass
class Bitstream:
    decoder_id: str
    height: int
    width: int
    latent_shape: tuple[int, ...]
    strings: list[list[bytes]]
    codec: str = ""
    """The codec's architecture; empty in format-1 files."""
    sampler: Optional[Sampler] = None
    tags: Optional[bytes] = None
    version: int = FORMAT_VERSION
    unknown_optional: list[str] = field(default_factory=list)
    """Optional sections this reader skipped."""

    def bits_per_pixel(self) -> float:
        return 8 * len(pack(self)) / (self.height * self.width)


def pack(stream: Bitstream) -> bytes:
    out = bytearray(MAGIC) + struct.pack("<B", FORMAT_VERSION) + bytes.fromhex(stream.decoder_id)
    out += _varint(stream.height) + _varint(stream.width)
    sections = [("codec", stream.codec.encode("ascii")), ("latents", _pack_latents(stream))]
    if stream.sampler is not None:
        sampler = stream.sampler
        sections.append(("sampler", _varint(sampler.steps) + _varint(sampler.seed) + struct.pack("<f", sampler.guidance)))
    if stream.tags is not None:
        sections.append(("tags", stream.tags))
    out += _varint(len(sections))
    for name, payload in sections:
        out += struct.pack("<B", len(name)) + name.encode("ascii") + struct.pack("<B", 0) + _varint(len(payload))
        out += payload
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def unpack(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Bitstream:
    """Parse and check a file; nothing is decoded here, so a refusal costs no memory."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a bitstream of this codec (bad magic bytes)")
    if len(data) < len(MAGIC) + 1 + 32 + 2 + 4:
        raise BitstreamError("bitstream is truncated (shorter than its header)")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream is corrupt or truncated (CRC32 mismatch)")
    reader = _Reader(body, len(MAGIC))
    version = reader.fixed("<B")
    if version not in READABLE_VERSIONS:
        raise BitstreamError(f"bitstream format {version} is not supported (this code reads {READABLE_VERSIONS})")
    stream = _unpack_v1(reader) if version == 1 else _unpack_v2(reader)
    if reader.pos != len(body):
        raise BitstreamError("bitstream has trailing bytes after its last section")
    if not 0 < stream.height * stream.width <= max_pixels:
        raise BitstreamError(f"bitstream claims a {stream.width}x{stream.height} image, outside 1..{max_pixels} pixels "
                             f"(max_pixels)")
    return stream


def _pack_latents(stream: Bitstream) -> bytes:
    out = bytearray(struct.pack("<B", len(stream.latent_shape)))
    for dim in stream.latent_shape:
        out += _varint(dim)
    out += struct.pack("<B", len(stream.strings))
    for group in stream.strings:
        out += _varint(len(group))
        for string in group:
            out += _varint(len(string)) + string
    return bytes(out)


def _read_latents(reader: _Reader) -> tuple[tuple[int, ...], list[list[bytes]]]:
    shape = tuple(reader.varint() for _ in range(reader.fixed("<B")))
    strings = [[reader.take(reader.varint()) for _ in range(reader.varint())] for _ in range(reader.fixed("<B"))]
    return shape, strings


def _unpack_v2(reader: _Reader) -> Bitstream:
    decoder_id = reader.take(32).hex()
    height, width = reader.varint(), reader.varint()
    found: dict[str, bytes] = {}
    skipped = []
    for _ in range(reader.varint()):
        name = reader.take(reader.fixed("<B")).decode("ascii", errors="replace")
        flags, payload = reader.fixed("<B"), reader.take(reader.varint())
        if name in found:
            raise BitstreamError(f"bitstream has section '{name}' twice")
        if name not in SECTIONS:
            if not flags & OPTIONAL:
                raise BitstreamError(f"bitstream has a required section '{name}' this reader does not know "
                                     f"(written by a newer version?)")
            skipped.append(name)
            continue
        found[name] = payload
    for name in ("codec", "latents"):
        if name not in found:
            raise BitstreamError(f"bitstream lacks its '{name}' section")
    sub = _Reader(found["latents"], 0)
    shape, strings = _read_latents(sub)
    _expect_end(sub, "latents")
    sampler = None
    if "sampler" in found:
        sub = _Reader(found["sampler"], 0)
        sampler = Sampler(sub.varint(), sub.varint(), struct.unpack("<f", sub.take(4))[0])
        _expect_end(sub, "sampler")
    return Bitstream(decoder_id, height, width, shape, strings, codec=found["codec"].decode("ascii", errors="replace"),
                     sampler=sampler, tags=found.get("tags"), version=2, unknown_optional=skipped)


def _unpack_v1(reader: _Reader) -> Bitstream:
    sha = reader.take(32).hex()
    height, width = reader.fixed("<I"), reader.fixed("<I")
    shape = tuple(reader.varint() for _ in range(reader.fixed("<B")))
    strings = [[reader.take(reader.varint()) for _ in range(reader.fixed("<B"))] for _ in range(reader.fixed("<B"))]
    return Bitstream(sha, height, width, shape, strings, version=1)


def _expect_end(reader: _Reader, name: str) -> None:
    if reader.pos != len(reader.data):
        raise BitstreamError(f"bitstream section '{name}' has trailing bytes")


@torch.no_grad()
def encode_image(model, x: torch.Tensor, decoder_id: str, sampler: Optional[Sampler] = None) -> Bitstream:
    """Entropy-code one image (1×C×H×W in [0, 1]); the model must have run ``update(force=True)``."""
    if x.shape[1] != model.in_channels:
        raise BitstreamError(f"the codec takes {model.in_channels}-channel images, got {x.shape[1]} channels")
    height, width = x.shape[-2:]
    out = model.compress(pad_to_multiple(x.to(codec_device(model)), model.pad_multiple))
    strings = [[bytes(s) for s in group] for group in out["strings"]]
    return Bitstream(decoder_id, height, width, tuple(int(d) for d in out["shape"]), strings,
                     codec=model.architecture, sampler=sampler)


@torch.no_grad()
def decode_output(model, stream: Bitstream, decoder_id: str, input_stride: int = 1) -> torch.Tensor:
    """What the codec reconstructs from the file (padded, unquantised: an image, or a latent for
    a codec of latents), after checking that this decoder wrote it and that its geometry fits."""
    if stream.decoder_id != decoder_id:
        raise BitstreamError(f"bitstream was made by decoder {stream.decoder_id[:12]}…, not by this one "
                             f"({decoder_id[:12]}…)")
    check_geometry(model, stream, input_stride)
    try:
        return model.decompress(stream.strings, list(stream.latent_shape))["x_hat"]
    except (RuntimeError, ValueError, IndexError, AssertionError) as err:
        raise BitstreamError(f"bitstream does not decode with this codec: {str(err).splitlines()[0]}") from None


def codec_device(model) -> torch.device:
    """Where a codec computes (the CPU, outside training: finals.place says why)."""
    return next(model.parameters()).device


def decode_image(model, stream: Bitstream, decoder_id: str) -> torch.Tensor:
    """The 8-bit image the file holds (as floats in [0, 1]), cropped to the original size."""
    return quantize_8bit(decode_output(model, stream, decoder_id)[..., : stream.height, : stream.width])


def check_geometry(model, stream: Bitstream, input_stride: int = 1) -> None:
    """The latent shape must be what this codec makes of an image of the stated size, so that a
    forged header cannot make the decoder allocate more than the image it claims. ``input_stride``:
    how much smaller than the image the codec's input is (a diffusion VAE's 8 for a latent codec)."""
    if stream.codec and stream.codec != model.architecture:
        raise BitstreamError(f"bitstream holds a {stream.codec} codec's latents, this model is {model.architecture}")
    if len(stream.strings) != model.string_groups or any(len(group) != 1 for group in stream.strings):
        raise BitstreamError(f"bitstream holds {[len(g) for g in stream.strings]} strings per entropy model; this "
                             f"codec codes one image as {model.string_groups} groups of one")
    pad = V1_PAD_MULTIPLE if stream.version == 1 else model.pad_multiple * input_stride
    stride = model.latent_stride * input_stride
    expected = tuple(math.ceil(side / pad) * pad // stride for side in (stream.height, stream.width))
    if tuple(stream.latent_shape) != expected:
        raise BitstreamError(f"bitstream's latent shape {tuple(stream.latent_shape)} does not fit a "
                             f"{stream.width}x{stream.height} image with this codec (expected {expected})")


def round_trip(model, x: torch.Tensor, decoder_id: str) -> tuple[bytes, torch.Tensor]:
    """(the file's bytes, the image decoded from those bytes): what evaluation measures."""
    data = pack(encode_image(model, x, decoder_id))
    return data, decode_image(model, unpack(data), decoder_id)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad bottom/right: cheaper to code than zeros, and cropped away after decoding."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def _varint(value: int) -> bytes:
    if value < 0:
        raise BitstreamError(f"cannot write a negative number ({value}) into a bitstream")
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
            raise BitstreamError("bitstream is truncated (a field runs past the end of the file)")
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

"""``compress`` and ``decompress``: image files to bitstream files and back, with the codec of any
stage whose manifest says it has one; a diffusion decoder's sampler settings travel in the file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.images import load_rgb, save_png, to_tensor
from foundation.files import atomic_write_bytes
from foundation.manifest import MANIFEST, ManifestError, read_manifest
from pl_modules.core import codec_module
from pl_modules.core.bitstream import DEFAULT_MAX_PIXELS, Bitstream, BitstreamError, decode_image, pack, unpack
from pl_modules.core.codecs import CODEC_FILE
from pl_modules.finals import decoder_id, load_final


@dataclass
class CompressResult:
    path: Path
    num_bytes: int
    height: int
    width: int

    @property
    def bpp(self) -> float:
        return 8 * self.num_bytes / (self.height * self.width)


def compress_file(image_path: str | Path, model_dir: str | Path, out_path: str | Path, seed: int = 0,
                  device: str = "cpu") -> CompressResult:
    """``seed``: the diffusion decoder's sampling seed, written into the file (ignored by plain codecs);
    ``device``: where the networks run (the entropy codec always on the CPU: finals.place)."""
    final = load_final(model_dir, need_codec=True, device=device)
    x = to_tensor(load_rgb(Path(image_path))).unsqueeze(0)
    data = pack(final.model.encode(x, final.decoder_id, seed, Path(image_path)))
    atomic_write_bytes(out_path, data)
    # bpp from the file as it lies on disk, not from the encoder's own count.
    return CompressResult(Path(out_path), Path(out_path).stat().st_size, x.shape[-2], x.shape[-1])


def decompress_file(bin_path: str | Path, out_path: str | Path, model_dir: str | Path | None = None,
                    search_roots: tuple[str | Path, ...] = ("checkpoints",),
                    max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "cpu") -> Path:
    stream = unpack(Path(bin_path).read_bytes(), max_pixels)
    if model_dir is None:
        model_dir = find_model(stream, search_roots)
    final = load_final(model_dir, need_codec=True, device=device)
    if stream.version == 1:  # named the codec's weights alone, and held a codec's image only
        decoded = decode_image(final.codec, stream, final.manifest.weights[CODEC_FILE])
    else:
        decoded = final.model.decode(stream, final.decoder_id)
    save_png(decoded.cpu(), out_path)
    return Path(out_path)


def find_model(stream: Bitstream, roots: tuple[str | Path, ...]) -> Path:
    """The one final/ under ``roots`` whose decoder the bitstream names; none or several different
    ones are refused (copies of the same decoder are one)."""
    matches: dict[str, Path] = {}
    for path in sorted(p for root in roots for p in Path(root).glob(f"**/final/{MANIFEST}")):
        try:
            manifest = read_manifest(path, verify=False)
        except ManifestError:
            continue
        if stream.version == 1:
            hit = manifest.stage == codec_module.STAGE and manifest.weights.get(CODEC_FILE) == stream.decoder_id
        else:
            hit = decoder_id(manifest) == stream.decoder_id
        if hit:
            matches.setdefault(decoder_id(manifest), path.parent)
    where = ", ".join(map(str, roots))
    if not matches:
        raise BitstreamError(f"no decoder {stream.decoder_id[:12]}… under {where}; pass -m RUN/STAGE/final")
    if len(matches) > 1:
        raise BitstreamError(f"{len(matches)} different decoders under {where} match {stream.decoder_id[:12]}… "
                             f"({', '.join(map(str, matches.values()))}); pass -m RUN/STAGE/final")
    return next(iter(matches.values()))

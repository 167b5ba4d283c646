"""``compress`` and ``decompress``: image files to bitstream files and back, with the codec of any
stage whose manifest says it has one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.images import load_rgb, save_png, to_tensor
from foundation.files import atomic_write_bytes
from foundation.manifest import MANIFEST, ManifestError, read_manifest
from pl_modules.bitstream import BitstreamError, decode_image, encode_image, pack, unpack
from pl_modules.codecs import CODEC_FILE
from pl_modules.finals import load_final


@dataclass
class CompressResult:
    path: Path
    num_bytes: int
    height: int
    width: int

    @property
    def bpp(self) -> float:
        return 8 * self.num_bytes / (self.height * self.width)


def compress_file(image_path: str | Path, model_dir: str | Path, out_path: str | Path) -> CompressResult:
    final = load_final(model_dir, need_codec=True)
    codec, sha = final.codec, final.stream_id
    x = to_tensor(load_rgb(Path(image_path))).unsqueeze(0)
    data = pack(encode_image(codec, x, sha))
    atomic_write_bytes(out_path, data)
    # bpp from the file as it lies on disk, not from the encoder's own count.
    return CompressResult(Path(out_path), Path(out_path).stat().st_size, x.shape[-2], x.shape[-1])


def decompress_file(bin_path: str | Path, out_path: str | Path, model_dir: str | Path | None = None,
                    search_roots: tuple[str | Path, ...] = ("checkpoints",)) -> Path:
    stream = unpack(Path(bin_path).read_bytes())
    if model_dir is None:
        model_dir = find_model(stream.model_sha256, search_roots)
    final = load_final(model_dir, need_codec=True)
    codec, sha = final.codec, final.stream_id
    save_png(decode_image(codec, stream, sha), out_path)
    return Path(out_path)


def find_model(weights_sha256: str, roots: tuple[str | Path, ...]) -> Path:
    """The stage-1 final/ whose codec weights have this sha256 (the bitstream names its model so)."""
    for root in roots:
        for manifest in sorted(Path(root).glob(f"**/final/{MANIFEST}")):
            try:
                if read_manifest(manifest, verify=False).weights.get(CODEC_FILE) == weights_sha256:
                    return manifest.parent
            except ManifestError:
                continue
    raise BitstreamError(f"no model with weights {weights_sha256[:12]}… under {', '.join(map(str, roots))}; "
                         f"pass -m RUN/stage1/final")

"""Peak memory and time of a Diff-ICMH decode at 2K, tiled against untiled, side by side in one run.

    python benchmarks/difficmh_decode_memory.py --final RUN/stage2-difficmh/final --size 2048

Compresses one photo upscaled to SIZE² with the final, then decompresses it in a fresh process per
setting (peak RSS is per process): the final's own tiling, and with VAE and latent tiling off
(skipped with --tiled-only: untiled, SD-sized models need tens of GiB). Prints peak RSS, wall time
and their ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DECODE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from pl_modules.core.bitstream import unpack
from pl_modules.finals import load_final
from pathlib import Path
final = load_final({final!r})
prior = final.model.prior
prior.cfg.latent_tile = {latent_tile}
if not {vae_tile}:
    prior.vae.disable_tiling()
start = time.perf_counter()
image = final.model.decode(unpack(Path({bitstream!r}).read_bytes()), final.decoder_id)
print(tuple(image.shape), time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def decode(final: Path, bitstream: Path, latent_tile: int, vae_tile: bool) -> tuple[float, float]:
    """(peak RSS in GiB, decode seconds) of one decode in a fresh process."""
    script = DECODE.format(root=str(ROOT), final=str(final), bitstream=str(bitstream), latent_tile=latent_tile,
                           vae_tile=vae_tile)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 2**20, float(out[-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--final", required=True, type=Path)
    parser.add_argument("--image", default=str(ROOT.parent / "shared" / "data" / "kodak" / "kodim23.png"))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tiled-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from pl_modules.codec_io import compress_file

    work = Path(tempfile.mkdtemp())
    photo = work / "photo.png"
    Image.open(args.image).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(photo)
    start = time.perf_counter()
    result = compress_file(photo, args.final, work / "photo.bin")
    print(f"compress {args.size}²: {time.perf_counter() - start:.1f} s, {result.bpp:.4f} bpp, "
          f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    manifest = json.loads((args.final / "manifest.json").read_text())
    tile = manifest["params"]["prior"]["latent_tile"]
    tiled = decode(args.final, work / "photo.bin", tile, True)
    print(f"decode tiled (latent_tile={tile}, VAE tiles): peak {tiled[0]:.2f} GiB, {tiled[1]:.1f} s")
    if not args.tiled_only:
        whole = decode(args.final, work / "photo.bin", 0, False)
        print(f"decode untiled: peak {whole[0]:.2f} GiB, {whole[1]:.1f} s")
        print(f"tiled / untiled: memory {tiled[0] / whole[0]:.2f}×, time {tiled[1] / whole[1]:.2f}×")


if __name__ == "__main__":
    main()

"""Command line: parse, validate the config, dispatch to a stage or a tool. Nothing else lives here."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

CONFIG_EPILOG = "config keys (set with key=value; YAML files given with -c are merged first):\n"
EXIT_CONFIG, EXIT_FAILED = 2, 1
EXIT_REQUEUED = 3
"""Stopped on SIGUSR1 after saving last.ckpt (and requeued under SLURM): the same command resumes."""
DEVICE_HELP = ("where the networks run: auto (the GPU when there is one), cpu, cuda, cuda:1; the entropy "
               "codec always runs on the CPU, so a file written on a GPU machine decodes on any other")


def schema_help(schema) -> str:
    from foundation.config import describe

    rows = describe(schema)
    width = max(len(key) for key, _, _ in rows)
    return CONFIG_EPILOG + "\n".join(f"  {key:<{width}}  {default:<14} {doc}" for key, default, doc in rows)


def add_config_command(sub, name: str, schema, help_text: str, presets: tuple[Path, ...] = ()):
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=schema_help(schema),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", default=[], help="YAML file(s) overriding the defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(schema=schema, presets=presets)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from evaluation.evaluate import EvaluateConfig
    from evaluation.judge import JudgeConfig
    from evaluation.tag_bits import TagBitsConfig
    from pl_modules.core.bitstream import DEFAULT_MAX_PIXELS
    from stages.pipeline import PipelineConfig
    from stages.preference_data import PreferenceShardsConfig
    from stages.quickstart import PRESET, QuickstartConfig
    from stages.registry import STAGE_KINDS
    from stages.sweep import SweepConfig

    parser = argparse.ArgumentParser(prog="train.py", description="Learned image compression with diffusion priors.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, kind in STAGE_KINDS.items():
        add_config_command(sub, name, kind.schema, kind.summary)
    add_config_command(sub, "quickstart", QuickstartConfig,
                       "build shards from bundled photos, train a small codec on CPU, print real-bitstream results",
                       presets=(PRESET,))
    pipeline = add_config_command(sub, "pipeline", PipelineConfig,
                                  "run declared stages in order over manifests: skip finished, resume interrupted")
    pipeline.add_argument("--from-stage", help="start here (earlier stages must be finished)")
    pipeline.add_argument("--until-stage", help="stop after this stage")
    pipeline.add_argument("--force", action="append", default=[], metavar="STAGE",
                          help="delete this stage's folder and run it again (repeatable)")
    sweep = add_config_command(sub, "sweep", SweepConfig,
                               "a grid of pipeline runs (λ first of all), here or as a SLURM job array")
    sweep.add_argument("--aggregate", action="store_true", help="only collect finished points into rd.json/rd.png")

    add_config_command(sub, "evaluate", EvaluateConfig,
                       "stage manifests and classical anchors on an image folder: RD JSONs, per-image CSV, plots")
    add_config_command(sub, "evaluate-judge", JudgeConfig, "agreement of judges with people on 2AFC pairs (BAPPS)")
    add_config_command(sub, "tag-bits", TagBitsConfig,
                       "bits of image tags as coded in the bitstream against fixed-length indices, over image folders")
    add_config_command(sub, "preference-shards", PreferenceShardsConfig,
                       "judged pairs from a stage-2 decoder into shards, for stage 3's offline mode")
    bd = sub.add_parser("bd-rate", help="BD-rate and BD-metric of RD JSONs against a reference")
    bd.add_argument("reference", help="CompressAI-format results JSON of the reference (anchor)")
    bd.add_argument("tests", nargs="+", help="results JSONs to compare with it")
    bd.add_argument("--metric", action="append", help="psnr, ms-ssim-db, lpips, ... (default: psnr and ms-ssim-db)")
    bd.add_argument("--method", choices=["cubic", "pchip"], default="cubic")
    bd.add_argument("--allow-unreliable", action="store_true",
                    help="compute BD figures the overlap or monotonicity check refuses, flagged with '!'")
    bd.add_argument("--json", help="also write the figures (and any refusal's reasons) to this JSON file")
    paired = sub.add_parser("paired", help="paired per-image differences of methods at the same λ, with a "
                                           "bootstrap interval, from evaluate's per_image.csv")
    paired.add_argument("per_image", help="per_image.csv written by train.py evaluate")
    paired.add_argument("--reference", required=True, help="method every test is compared with (e.g. baseline-dehaze)")
    paired.add_argument("--test", action="append", required=True, help="method to compare (repeatable)")
    paired.add_argument("--metric", default="psnr", help="column of per_image.csv (default: psnr)")
    paired.add_argument("--json", help="also write the rows to this JSON file")

    shards = sub.add_parser("shards", help="write WebDataset shards from an image folder")
    shards.add_argument("src_dir")
    shards.add_argument("out_dir")
    shards.add_argument("--samples-per-shard", type=int, default=100)
    shards.add_argument("--min-size", type=int, default=0, help="skip images whose short side is smaller")
    shards.add_argument("--pairs", action="store_true", help="write (degraded, clean, task) pairs for stage 2")
    shards.add_argument("--tasks", nargs="+", default=["dehaze", "denoise", "derain", "deraindrop", "deshadow",
                                                      "inpaint"], help="with --pairs: degradations to synthesise")
    shards.add_argument("--seed", type=int, default=0, help="with --pairs: seed of the synthesis")
    shards.add_argument("--tag-suffix", default=".tags",
                        help="an image's tags (one per line) in the file of this suffix beside it go into its sample")
    shards.add_argument("--tag-dirs", nargs="+", default=[],
                        help="look for the tag files in these label folders instead (e.g. configs/tags/labels/kodak)")
    shards.add_argument("--real-pairs", nargs=3, metavar=("DEGRADED_SUFFIX", "CLEAN_SUFFIX", "TASK"),
                        help="with --pairs: real pairs by file-name suffix, e.g. _real _mean denoise (PolyU)")

    compress = sub.add_parser("compress", help="encode an image into a bitstream file")
    compress.add_argument("image")
    compress.add_argument("-m", "--model", required=True, help="a final/ folder of any stage with a codec")
    compress.add_argument("-o", "--output", required=True)
    compress.add_argument("--seed", type=int, default=0, help="a diffusion decoder's sampling seed, kept in the file")
    compress.add_argument("--device", default="auto", help=DEVICE_HELP)

    decompress = sub.add_parser("decompress", help="decode a bitstream file into a PNG")
    decompress.add_argument("bitstream")
    decompress.add_argument("-o", "--output", required=True)
    decompress.add_argument("-m", "--model", help="a final/ folder (default: found under checkpoints/ by the "
                                                  "decoder id the file names)")
    decompress.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help="refuse a file that claims a larger image (default: 16384²)")
    decompress.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser


def resolve_config(args):
    from foundation.config import load_config, to_yaml

    files = [*args.presets, *args.config]
    if args.print_config:
        # The template as it stands: required values not yet given show as ???.
        print(to_yaml(load_config(args.schema, files, args.overrides, allow_missing=True)), end="")
        return None
    return load_config(args.schema, files, args.overrides)


def run_command(args) -> None:
    if args.command == "shards":
        from datamodules.shards import write_pair_shards, write_shards

        if args.pairs:
            real = tuple(args.real_pairs) if args.real_pairs else None
            summary = write_pair_shards(args.src_dir, args.out_dir, args.tasks, args.seed, args.samples_per_shard,
                                        args.min_size, real_pairs=real)
        else:
            summary = write_shards(args.src_dir, args.out_dir, args.samples_per_shard, args.min_size,
                                   tag_suffix=args.tag_suffix, tag_dirs=args.tag_dirs)
        print(summary.report())
    elif args.command == "compress":
        from pl_modules.codec_io import compress_file

        result = compress_file(args.image, args.model, args.output, args.seed, args.device)
        print(f"{result.path}: {result.num_bytes} bytes, {result.width}x{result.height}, {result.bpp:.4f} bpp")
    elif args.command == "decompress":
        from pl_modules.codec_io import decompress_file

        written = decompress_file(args.bitstream, args.output, args.model, max_pixels=args.max_pixels,
                                  device=args.device)
        print(f"wrote {written}")
    elif args.command == "bd-rate":
        import json

        from evaluation.rd import bd_results, bd_table

        load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
        entries = bd_results(load(args.reference), [load(p) for p in args.tests], args.metric or ["psnr", "ms-ssim-db"],
                             args.method, args.allow_unreliable)
        print(bd_table(entries))
        if args.json:
            Path(args.json).write_text(json.dumps(entries, indent=2) + "\n")
    elif args.command == "paired":
        import json

        from evaluation.paired import paired_differences, paired_table, read_rows

        table = read_rows(args.per_image)
        entries = [e for test in args.test for e in paired_differences(table, args.reference, test, args.metric)]
        if not entries:
            raise ValueError(f"{args.per_image} has no setting where {args.reference} and {', '.join(args.test)} both have rows")
        print(paired_table(entries))
        if args.json:
            Path(args.json).write_text(json.dumps(entries, indent=2) + "\n")
    elif (cfg := resolve_config(args)) is not None:
        from stages.registry import STAGE_KINDS

        if args.command in STAGE_KINDS:
            print(f"final: {STAGE_KINDS[args.command].run(cfg)}")
        elif args.command == "quickstart":
            from stages import quickstart

            quickstart.run(cfg)
        elif args.command == "pipeline":
            from stages import pipeline

            launch = pipeline.submit_to_slurm if cfg.launcher == "slurm" else pipeline.run
            launch(cfg, args.from_stage, args.until_stage, tuple(args.force))
        elif args.command == "evaluate":
            from evaluation import evaluate

            evaluate.run(cfg)
        elif args.command == "evaluate-judge":
            from evaluation import judge

            judge.run(cfg)
        elif args.command == "tag-bits":
            from evaluation import tag_bits

            tag_bits.run(cfg)
        elif args.command == "preference-shards":
            from stages import preference_data

            print(preference_data.run(cfg).report())
        elif args.command == "sweep":
            from stages import sweep

            (sweep.aggregate if args.aggregate else sweep.run)(cfg)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # CompressAI's import-time torch.jit.script calls warn on every run and say nothing actionable.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    # Our checkpoints are taken after the optimizer step on purpose: global_step counts finished steps.
    warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Frozen pretrained parts (VAE, UNet base, CLIP) stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    from foundation.config import ConfigError
    from foundation.manifest import ManifestError
    from pl_modules.core.bitstream import BitstreamError
    from stages.trainer import PeerLost, Requeued

    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except (BitstreamError, ManifestError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except PeerLost as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Requeued as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_REQUEUED
    return 0


if __name__ == "__main__":
    sys.exit(main())

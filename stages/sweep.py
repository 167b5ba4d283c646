"""``train.py sweep``: a grid over any stage keys (λ first of all), one pipeline run per point, run
here one after another or as a SLURM job array; then one RD JSON and plot over the finished points."""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.rd import plot_rd, rd_results
from foundation.config import ConfigError, load_config, to_yaml
from foundation.files import atomic_write_text
from foundation.manifest import ManifestError, read_manifest
from pl_modules.finals import rate_setting
from stages import pipeline, slurm
from stages.pipeline import PipelineConfig
from stages.registry import STAGE_KINDS
from stages.slurm import LaunchConfig

@dataclass
class SweepConfig(LaunchConfig):
    name: str = "???"
    """Sweep name: runs go to <output_root>/<name>/<point>/."""
    pipeline: str = "???"
    """The pipeline YAML every point runs."""
    output_root: str = "checkpoints/sweeps"
    """Folder holding every sweep."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides of the pipeline config (run-level keys), for every point."""
    stage_overrides: list[str] = field(default_factory=list)
    """key=value overrides of every stage of every point (data paths, launch settings)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """'<stage name>.<key>' → values (e.g. codec.lmbda: [0.0035, 0.013]), combined as `combine` says."""
    combine: str = "product"
    """product: every combination of the grid's values; zip: the i-th value of every key together
    (keys that move with λ, such as a later stage's distortion weight or CompressAI's N and M)."""
    rd_stage: str = ""
    """Stage whose manifest metrics make the RD points (empty: the pipeline's last stage)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.combine not in ("product", "zip"):
            raise ConfigError(f"combine must be product or zip, got '{self.combine}'")
        if self.combine == "zip" and len({len(v) for v in self.grid.values()}) > 1:
            raise ConfigError("combine=zip needs the same number of values under every grid key, got "
                              + ", ".join(f"{k}: {len(v)}" for k, v in self.grid.items()))
        for key, values in self.grid.items():
            if "." not in key:
                raise ConfigError(f"grid key '{key}' must be '<stage name>.<config key>'")
            if not values:
                raise ConfigError(f"grid key '{key}' has no values")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_root) / self.name


def points(sweep: SweepConfig) -> list[dict[str, Any]]:
    keys = list(sweep.grid)
    combine = zip if sweep.combine == "zip" else itertools.product
    return [dict(zip(keys, values)) for values in combine(*(sweep.grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """Readable values plus a short hash of the whole point (values alone can collide once cleaned).
    No commas: a folder name must pass unquoted inside a ``key=[a,b]`` list override."""
    readable = "_".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())
    digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:6]
    return f"{readable.replace('/', '_')}-{digest}"


def point_pipeline(sweep: SweepConfig, point: dict[str, Any]) -> PipelineConfig:
    base = load_config(PipelineConfig, [sweep.pipeline], [*sweep.overrides, f"output_root={sweep.sweep_dir.resolve()}",
                                                         f"run={point_name(point)}"])
    base.overrides += sweep.stage_overrides
    by_name = {entry.name: entry for entry in base.stages}
    for key, value in point.items():
        stage, dotted = key.split(".", 1)
        if stage not in by_name:
            raise ConfigError(f"grid key '{key}': no stage named '{stage}' (stages: {', '.join(by_name)})")
        by_name[stage].overrides.append(f"{dotted}={value}")
    if sweep.rd_stage and sweep.rd_stage not in by_name:
        raise ConfigError(f"rd_stage '{sweep.rd_stage}': no such stage (stages: {', '.join(by_name)})")
    pipeline.plan(base)  # every point's every stage must validate before the first one trains
    return base


def run(sweep: SweepConfig) -> None:
    configs = [point_pipeline(sweep, p) for p in points(sweep)]
    if sweep.launcher == "slurm":
        for cfg in configs:
            cfg.overrides += slurm.trainer_overrides(sweep.slurm)
    points_dir = sweep.sweep_dir / "points"
    for index, cfg in enumerate(configs):
        atomic_write_text(points_dir / f"{index:03d}.yaml", to_yaml(cfg))
    if sweep.launcher == "slurm":
        # Each array task is one point: a full (multi-node) pipeline run that resumes where it stopped.
        point = f"{points_dir.resolve()}/$(printf %03d $SLURM_ARRAY_TASK_ID).yaml"
        script = slurm.write_script(sweep.slurm, sweep.name, ["pipeline", "-c", point],
                                    sweep.sweep_dir.resolve() / "sweep.sbatch", array=len(configs))
        slurm.launch(script, sweep.submit)
        return
    for index, cfg in enumerate(configs):
        print(f"=== sweep {sweep.name}: point {index + 1}/{len(configs)}: {cfg.run}", flush=True)
        pipeline.run(cfg)
    aggregate(sweep)


def aggregate(sweep: SweepConfig) -> Path:
    """RD JSON (CompressAI's results format) and plot over the points whose RD stage has finished."""
    manifests, missing, prefixes = [], [], set()
    for point in points(sweep):
        cfg = point_pipeline(sweep, point)
        stage = {s.name: s for s in cfg.stages}[sweep.rd_stage or cfg.stages[-1].name]
        prefixes.add(STAGE_KINDS[stage.kind].rd_prefix)
        final = Path(cfg.output_root) / cfg.run / stage.name / "final"
        try:
            metrics = read_manifest(final, verify=False).metrics
            manifests.append(({**point, "lmbda": rate_setting(final)}, metrics))
        except ManifestError:
            missing.append(cfg.run)
    if not manifests:
        raise ConfigError(f"no finished point in sweep {sweep.name} yet")
    results = rd_results(sweep.name, f"sweep over {', '.join(sweep.grid)}", manifests, prefix=prefixes.pop())
    out = sweep.sweep_dir / "rd.json"
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    plot_rd([results], sweep.sweep_dir / "rd.png")
    print(f"RD points: {len(manifests)} ({out}, {sweep.sweep_dir / 'rd.png'})")
    if missing:
        print(f"not finished yet: {', '.join(missing)}")
    return out

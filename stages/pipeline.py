"""``train.py pipeline``: stages in order over manifests; finished stages are skipped, interrupted
ones resume from their own last.ckpt, and every stage's config is validated before any runs."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from foundation.config import LAUNCH_KEYS, ConfigError, load_config, to_yaml
from foundation.files import atomic_write_text
from foundation.manifest import ManifestError, read_manifest
from stages import slurm
from stages.registry import STAGE_KINDS
from stages.slurm import LaunchConfig
from stages.trainer import last_checkpoint

PLACEMENT_KEYS = ("run", "output_root", "name", "init_from")
PARENT_RECORD = "parent.json"


class StaleStageError(ConfigError):
    """A finished stage whose config differs from the one asked for: rerun it on purpose or move it."""


@dataclass
class PipelineStage:
    name: str = "???"
    """The stage's folder in the run, and how later stages refer to it."""
    kind: str = "???"
    """Stage kind (see stages/registry.py): stage1 or stage2-llicm."""
    config: list[str] = field(default_factory=list)
    """YAML presets of the stage's schema, merged in order."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides of the stage's schema."""
    init_from: Optional[str] = None
    """An earlier stage of this pipeline, by name, or a final/ folder."""


@dataclass
class PipelineConfig(LaunchConfig):
    run: str = "default"
    """Run name: stages go to <output_root>/<run>/<stage name>/."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to every stage first (launch settings: trainer.devices=8, ...)."""
    output_root: str = "checkpoints"
    """Folder holding every run."""
    stages: list[PipelineStage] = field(default_factory=list)
    """The stages, in the order they run."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stages:
            raise ConfigError("a pipeline needs at least one entry in stages")
        names = [s.name for s in self.stages]
        for index, entry in enumerate(self.stages):
            if entry.kind not in STAGE_KINDS:
                raise ConfigError(f"stages.{index}.kind '{entry.kind}' is not one of {sorted(STAGE_KINDS)}")
            if STAGE_KINDS[entry.kind].parent and not entry.init_from:
                raise ConfigError(f"stages.{index} ({entry.name}): init_from must name "
                                  f"{STAGE_KINDS[entry.kind].parent}")
            if names.count(entry.name) > 1:
                raise ConfigError(f"stages.{index}.name '{entry.name}' is used twice")
            if entry.init_from in names and names.index(entry.init_from) >= index:
                raise ConfigError(f"stages.{index}.init_from '{entry.init_from}' is not an earlier stage")


@dataclass
class PlannedStage:
    entry: PipelineStage
    cfg: Any
    parent: Optional[Path]


def plan(pipeline: PipelineConfig) -> list[PlannedStage]:
    """Every stage's typed config, resolved and validated before anything runs."""
    planned, finals = [], {}
    for entry in pipeline.stages:
        kind = STAGE_KINDS[entry.kind]
        parent = finals.get(entry.init_from) or (Path(entry.init_from) if entry.init_from else None)
        placement = [f"run={pipeline.run}", f"output_root={pipeline.output_root}", f"name={entry.name}"]
        if parent:
            placement.append(f"init_from={parent}")
        try:
            cfg = load_config(kind.schema, entry.config, [*pipeline.overrides, *entry.overrides, *placement])
        except ConfigError as err:
            raise ConfigError(f"stage '{entry.name}': {err}") from None
        finals[entry.name] = cfg.stage_dir / "final"
        planned.append(PlannedStage(entry, cfg, parent))
    return planned


def finished(stage: PlannedStage) -> bool:
    """A stage is finished when its final/ is intact, was made from this very config, and from the
    parent that exists now; a final/ from another config is an error, not something to overwrite."""
    final = stage.cfg.stage_dir / "final"
    if not final.exists():
        return False
    try:
        manifest = read_manifest(final, expect_stage=STAGE_KINDS[stage.entry.kind].manifest_stage)
    except ManifestError:
        return False
    if _computation(_saved_config(final, type(stage.cfg))) != _computation(OmegaConf.structured(stage.cfg)):
        raise StaleStageError(f"stage '{stage.entry.name}' finished with another config ({final}/config.yaml); "
                          f"pass --force {stage.entry.name} or use a new run name")
    if stage.parent is not None and read_manifest(stage.parent, verify=False).weights != manifest.parent_weights:
        return False
    return True


def restart_if_parent_changed(stage: PlannedStage, label: str) -> None:
    """A stage started from other parent weights than those there now is stale as a whole: its
    checkpoint and final/ go, and it starts over. ``parent.json`` records what it started from."""
    if stage.parent is None:
        return
    record = stage.cfg.stage_dir / PARENT_RECORD
    current = read_manifest(stage.parent, verify=False).weights
    if record.is_file() and json.loads(record.read_text()) != current:
        remove_stage(stage.cfg.stage_dir, f"{label}: its parent {stage.parent} changed since it started")
    if launch_rank_is_zero():
        atomic_write_text(record, json.dumps(current, indent=1, sort_keys=True) + "\n")


def launch_rank_is_zero() -> bool:
    """Rank zero before any process group exists. Lightning's own DDP launcher re-runs this very
    command in its child processes, which must not repeat what rank zero did to the file system."""
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def remove_stage(stage_dir: Path, reason: str) -> None:
    """Delete a stage folder to run the stage afresh, from rank zero only. Ranks started together
    by torchrun or srun would race with the deletion, so there it is refused."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise ConfigError(f"{reason}: {stage_dir} must be removed first, which a multi-rank launch cannot do "
                          f"safely; run the same pipeline command once in a single process with --until-stage, "
                          f"or remove the folder by hand")
    if launch_rank_is_zero():
        print(f"{reason}: removing {stage_dir}")
        shutil.rmtree(stage_dir)


def _saved_config(final: Path, schema: type):
    """A final's config over today's schema: a field added since, at its default, changes nothing."""
    saved = OmegaConf.load(final / "config.yaml")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), saved)
    except OmegaConfBaseException:  # a key the schema no longer has: another config by any reading
        return saved


def _computation(cfg) -> dict:
    """The config less where the stage lives and how it is launched: what it computes. (The parent
    is compared by its weights' hashes, not by its path.)"""
    plain = OmegaConf.to_container(cfg)
    for key in PLACEMENT_KEYS:
        plain.pop(key, None)
    for key in LAUNCH_KEYS:
        plain.get("trainer", {}).pop(key, None)
    return plain


def submit_to_slurm(pipeline: PipelineConfig, from_stage: str | None = None, until_stage: str | None = None,
                    force: tuple[str, ...] = ()) -> Path:
    """Write the run's resolved pipeline (launcher=local, trainer keys matching ``slurm``) and a
    batch script that runs it on every task; submit it when ``submit``. The same command resumes
    after a requeue: finished stages are skipped, the interrupted one continues from last.ckpt."""
    if force:
        raise ConfigError("--force removes stage folders, which a queued multi-rank job cannot do safely: "
                          "run it here first with --until-stage, then submit")
    run_dir = (Path(pipeline.output_root) / pipeline.run).resolve()
    local = dataclasses.replace(pipeline, launcher="local", submit=False, output_root=str(Path(pipeline.output_root).resolve()),
                                overrides=[*pipeline.overrides, *slurm.trainer_overrides(pipeline.slurm)])
    plan(local)  # every stage validates before anything is queued
    atomic_write_text(run_dir / "pipeline.yaml", to_yaml(local))
    command = ["pipeline", "-c", str(run_dir / "pipeline.yaml")]
    command += ["--from-stage", from_stage] if from_stage else []
    command += ["--until-stage", until_stage] if until_stage else []
    script = slurm.write_script(pipeline.slurm, pipeline.run, command, run_dir / "pipeline.sbatch")
    slurm.launch(script, pipeline.submit)
    return script


def run(pipeline: PipelineConfig, from_stage: str | None = None, until_stage: str | None = None,
        force: tuple[str, ...] = ()) -> list[Path]:
    stages = plan(pipeline)
    names = [s.entry.name for s in stages]
    for name in (from_stage, until_stage, *force):
        if name is not None and name not in names:
            raise ConfigError(f"no stage named '{name}' in this pipeline (stages: {', '.join(names)})")
    first = names.index(from_stage) if from_stage else 0
    last = names.index(until_stage) if until_stage else len(names) - 1
    finals, ran = [], 0
    for index, stage in enumerate(stages):
        label = f"[{index + 1}/{len(stages)}] {stage.entry.name} ({stage.entry.kind})"
        if stage.entry.name in force and index <= last and stage.cfg.stage_dir.exists():
            remove_stage(stage.cfg.stage_dir, f"{label}: --force")
        if index > last:
            break
        if index < first and not finished(stage):
            raise ConfigError(f"{label} is not finished, and --from-stage {from_stage} skips it")
        final, trained = run_or_skip(stage, label)
        finals.append(final)
        ran += trained
    if ran == 0:
        print(f"pipeline '{pipeline.run}': every selected stage is finished; nothing to do")
    return finals


def run_or_skip(stage: PlannedStage, label: str) -> tuple[Path, bool]:
    """(the stage's final/, whether it trained now): a finished stage is skipped, an interrupted one
    resumes, one whose parent changed starts over."""
    final = stage.cfg.stage_dir / "final"
    if finished(stage):
        print(f"{label}: finished, skipped ({final})")
        return final, False
    restart_if_parent_changed(stage, label)
    resume = last_checkpoint(stage.cfg.stage_dir)
    print(f"{label}: " + (f"resuming from {resume}" if resume else "starting"), flush=True)
    return STAGE_KINDS[stage.entry.kind].run(stage.cfg), True

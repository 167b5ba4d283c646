"""The orchestrator: chained stages over manifests, skip logic, forced re-runs, sweeps, NaN stops."""
import json

import pytest
import torch
import yaml

from conftest import ROOT, tiny_overrides
from foundation.config import ConfigError, load_config
from foundation.manifest import read_manifest
from pl_modules.core import rate_distortion
from stages import pipeline, stage1, sweep
from stages.pipeline import PipelineConfig
from stages.sweep import SweepConfig

pytestmark = pytest.mark.chain


def pipeline_yaml(path, shard_dir, eval_dir, codec_extra=(), finetune=True):
    stages = [{"name": "codec", "kind": "stage1", "overrides": ["trainer.max_steps=20", "trainer.val_every=20",
                                                                *codec_extra]}]
    if finetune:
        stages.append({"name": "finetune", "kind": "stage1", "init_from": "codec",
                       "overrides": ["lmbda=0.013", "trainer.max_steps=10", "trainer.val_every=10",
                                     "data.val_max_images=1"]})
    path.write_text(yaml.safe_dump({"run": "p", "output_root": str(path.parent / "runs"),
                                    "overrides": tiny_overrides(shard_dir, eval_dir), "stages": stages}))
    return path


def load(path, *overrides):
    return load_config(PipelineConfig, [path], list(overrides))


def test_stages_chain_through_manifests_and_a_second_call_trains_nothing(tmp_path, shard_dir, eval_dir, capsys):
    path = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir)
    codec_final, finetune_final = pipeline.run(load(path))
    child, parent = read_manifest(finetune_final), read_manifest(codec_final)
    assert child.parent == str((codec_final / "manifest.json").resolve())
    assert child.parent_weights == parent.weights and child.params["lmbda"] == 0.013
    stamps = {p: p.stat().st_mtime_ns for p in (codec_final / "manifest.json", finetune_final / "manifest.json")}
    capsys.readouterr()
    pipeline.run(load(path))
    out = capsys.readouterr().out
    assert "nothing to do" in out and out.count("finished, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Launch settings do not make a finished stage stale.
    launch = [*tiny_overrides(shard_dir, eval_dir), "trainer.progress_bar=true", "trainer.log_every=7"]
    pipeline.run(load(path, f"overrides=[{','.join(launch)}]"))
    assert "nothing to do" in capsys.readouterr().out
    # A field added to the schema since (here: one the saved config lacks) keeps its default: still finished.
    saved = codec_final / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["straight_through"], old["data"]["augment"]
    saved.write_text(yaml.safe_dump(old))
    pipeline.run(load(path))
    assert "nothing to do" in capsys.readouterr().out


def test_a_changed_finished_stage_is_refused_and_force_reruns_it_and_its_children(tmp_path, shard_dir, eval_dir):
    path = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir)
    first_codec, _ = pipeline.run(load(path))
    old_weights = read_manifest(first_codec).weights
    changed = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, codec_extra=["trainer.seed=3"])
    with pytest.raises(ConfigError, match="stage 'codec' finished with another config"):
        pipeline.run(load(changed))
    codec_final, finetune_final = pipeline.run(load(changed), force=("codec",))
    new_weights = read_manifest(codec_final).weights
    assert new_weights != old_weights
    assert read_manifest(finetune_final).parent_weights == new_weights  # the child re-ran on the new parent


def test_from_and_until_stage(tmp_path, shard_dir, eval_dir):
    path = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir)
    with pytest.raises(ConfigError, match="not finished, and --from-stage finetune skips it"):
        pipeline.run(load(path), from_stage="finetune")
    finals = pipeline.run(load(path), until_stage="codec")
    assert len(finals) == 1 and not (tmp_path / "runs" / "p" / "finetune").exists()
    with pytest.raises(ConfigError, match="no stage named 'decoder'"):
        pipeline.run(load(path), until_stage="decoder")


def test_bad_pipelines_fail_before_anything_runs(tmp_path, shard_dir, eval_dir):
    path = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, codec_extra=["codec.width=3"])
    with pytest.raises(ConfigError, match="stage 'codec': unknown config key 'codec.width'"):
        pipeline.run(load(path))
    assert not (tmp_path / "runs").exists()
    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["kind"] = "stage9"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="stages.0.kind 'stage9'"):
        load(path)


def test_a_three_lambda_sweep_gives_three_manifests_and_a_monotone_rd_curve(tmp_path, shard_dir, eval_dir):
    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False,
                         codec_extra=["trainer.max_steps=60", "trainer.val_every=60"])
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "lam", "pipeline": str(pipe), "output_root": str(tmp_path / "sweeps"),
                                    "grid": {"codec.lmbda": [0.0005, 0.005, 0.05]}}))
    cfg = load_config(SweepConfig, [spec])
    sweep.run(cfg)
    manifests = sorted((tmp_path / "sweeps" / "lam").glob("*/codec/final/manifest.json"))
    assert len(manifests) == 3
    rd = json.loads((tmp_path / "sweeps" / "lam" / "rd.json").read_text())
    assert rd["name"] == "lam" and set(rd["results"]) >= {"bpp", "psnr-rgb", "ms-ssim"}
    lambdas_by_rate = [p["lmbda"] for p in rd["points"]]
    assert lambdas_by_rate == [0.0005, 0.005, 0.05]  # bpp falls as λ falls
    assert (tmp_path / "sweeps" / "lam" / "rd.png").stat().st_size > 10_000


def test_slurm_launcher_writes_a_job_array_of_full_pipeline_runs(tmp_path, shard_dir, eval_dir):
    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "lam", "pipeline": str(pipe), "output_root": str(tmp_path / "sweeps"),
                                    "grid": {"codec.lmbda": [0.001, 0.01], "codec.codec.N": [32, 48]},
                                    "launcher": "slurm", "slurm": {"nodes": 2, "gpus_per_node": 4}}))
    sweep.run(load_config(SweepConfig, [spec]))
    script = (tmp_path / "sweeps" / "lam" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --nodes=2" in script
    assert "#SBATCH --ntasks-per-node=4" in script and "--requeue" in script
    point = load_config(PipelineConfig, [tmp_path / "sweeps" / "lam" / "points" / "003.yaml"])
    assert {"trainer.num_nodes=2", "trainer.devices=4", "trainer.strategy=ddp"} <= set(point.overrides)
    assert set(point.stages[0].overrides[-2:]) == {"lmbda=0.01", "codec.N=48"}
    assert not any((tmp_path / "sweeps" / "lam").glob("*/codec"))  # nothing trained here


def test_slurm_settings_choose_tasks_devices_and_script_lines(tmp_path, monkeypatch):
    from stages.slurm import SlurmConfig, trainer_overrides, write_script

    cpu = load_config(SlurmConfig, overrides=["gpus_per_node=0", "nodes=2", "mem=16G", "qos=low", "cpus_per_task=4"])
    assert cpu.tasks == 1 and trainer_overrides(cpu)[:4] == [
        "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu", "trainer.strategy=ddp"]
    script = write_script(cpu, "j", ["pipeline", "-c", "a b.yaml"], tmp_path / "j.sbatch").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --mem=16G" in script and "#SBATCH --qos=low" in script
    assert "#SBATCH --ntasks-per-node=1" in script and "--array" not in script and "pipeline -c 'a b.yaml'" in script
    assert load_config(SlurmConfig, overrides=["gpus_per_node=0", "tasks_per_node=3"]).tasks == 3
    single = load_config(SlurmConfig, overrides=["gpus_per_node=1"])
    assert "trainer.strategy=auto" in trainer_overrides(single) and "trainer.accelerator=gpu" in trainer_overrides(single)
    with pytest.raises(ConfigError, match="tasks_per_node=2 on nodes with 4 GPUs"):
        load_config(SlurmConfig, overrides=["gpus_per_node=4", "tasks_per_node=2"])


def test_a_single_pipeline_is_written_as_a_batch_job_and_submit_needs_sbatch(tmp_path, shard_dir, eval_dir,
                                                                             monkeypatch, capsys):
    from train import main

    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False)
    assert main(["pipeline", "-c", str(pipe), "launcher=slurm", "slurm.gpus_per_node=2", "--until-stage", "codec"]) == 0
    run_dir = tmp_path / "runs" / "p"
    script = (run_dir / "pipeline.sbatch").read_text()
    assert f"pipeline -c {run_dir / 'pipeline.yaml'} --until-stage codec" in script
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "submit with: sbatch" in capsys.readouterr().out and not (run_dir / "codec").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["pipeline", "-c", str(pipe), "launcher=slurm", "submit=true"]) == 2
    assert "sbatch is not on this machine's PATH" in capsys.readouterr().err
    assert main(["pipeline", "-c", str(pipe), "launcher=slurm", "--force", "codec"]) == 2


def test_a_zipped_grid_moves_keys_together_and_refuses_uneven_lists(tmp_path, shard_dir, eval_dir):
    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False)
    grid = {"codec.lmbda": [0.001, 0.01, 0.1], "codec.codec.N": [32, 48, 64]}
    cfg = load_config(SweepConfig, overrides=["name=z", f"pipeline={pipe}", "combine=zip"])
    cfg.grid = grid
    assert sweep.points(cfg) == [{"codec.lmbda": lam, "codec.codec.N": n} for lam, n in zip(*grid.values())]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "z", "pipeline": str(pipe), "combine": "zip",
                                    "grid": {"codec.lmbda": [0.001, 0.01], "codec.codec.N": [32]}}))
    with pytest.raises(ConfigError, match="same number of values.*codec.codec.N: 1"):
        load_config(SweepConfig, [spec])


def test_a_non_finite_loss_stops_the_stage_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, shard_dir, eval_dir, monkeypatch):
    calls = {"n": 0}
    real = rate_distortion.RD_LOSSES["mse"]

    def poisoned(x_hat, x, bpp, lmbda):
        calls["n"] += 1
        out = real(x_hat, x, bpp, lmbda)
        return {**out, "loss": out["loss"] * float("nan")} if calls["n"] == 7 else out

    monkeypatch.setitem(rate_distortion.RD_LOSSES, "mse", poisoned)
    cfg = load_config(stage1.Stage1Config, overrides=[f"output_root={tmp_path}",
                                                      *tiny_overrides(shard_dir, eval_dir), "trainer.checkpoint_every=3"])
    with pytest.raises(FloatingPointError, match="non-finite loss at step 6"):
        stage1.run(cfg)
    state = torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (cfg.stage_dir / "final").exists()


def test_sweep_points_are_named_by_their_values_and_a_hash():
    name = sweep.point_name({"codec.lmbda": 0.0067, "codec.codec.N": 128})
    assert name.startswith("lmbda=0.0067_N=128-") and len(name.rsplit("-", 1)[1]) == 6
    assert name != sweep.point_name({"codec.lmbda": 0.0067, "codec.codec.N": 192})


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_pipeline_plans_with_valid_stage_configs(path, tmp_path, monkeypatch):
    """Every stage of every pipeline in configs/ (tiny and real-size) resolves to a valid typed config
    (data paths that a pipeline leaves to its user given here, as its header says)."""
    monkeypatch.chdir(ROOT)  # the pipelines name their stage presets relative to the repository
    cfg = load_config(PipelineConfig, [path], [f"output_root={tmp_path}", "overrides=[data.val_dir=/data/kodak,data.train_shards=/data/shards]"])
    planned = pipeline.plan(cfg)
    assert [stage.cfg.name for stage in planned] == [entry.name for entry in cfg.stages]
    for stage in planned:
        assert stage.cfg.trainer.max_steps > 0

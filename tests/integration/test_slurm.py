"""Launching through a real SLURM: a two-node cluster on this machine (tests/slurm_cluster.py),
started for these tests and removed after them; skipped, saying why, where it cannot run."""
import json

import pytest
import torch
import yaml

from slurm_cluster import Cluster, unavailable
from integration.test_distributed import free_port
from integration.test_pipeline import pipeline_yaml

pytestmark = [pytest.mark.chain, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

CPU_JOB = ["slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.time=00:10:00"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """The submitting shell's environment, which sbatch hands to the job: the cluster's config, and
    the rendezvous address the node names would resolve to on a real cluster."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    return cluster


def submitted_job(out: str) -> str:
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("submitted job"))


def ended(cluster: Cluster, job: str, logs, timeout: float = 400) -> None:
    states = cluster.wait(job, timeout)
    assert set(states) == {"COMPLETED"}, (states, "\n".join(p.read_text()[-3000:] for p in logs.glob("*.out")))


def test_a_lambda_sweep_runs_as_a_job_array_on_cpu_nodes_and_aggregates(slurm_env, tmp_path, shard_dir, eval_dir,
                                                                        capsys):
    from train import main

    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "lam", "pipeline": str(pipe), "output_root": str(tmp_path / "sweeps"),
                                    "grid": {"codec.lmbda": [0.001, 0.01]}, "launcher": "slurm", "submit": True}))
    assert main(["sweep", "-c", str(spec), *CPU_JOB]) == 0
    script = (tmp_path / "sweeps" / "lam" / "sweep.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "--gpus-per-node" not in script
    ended(slurm_env, submitted_job(capsys.readouterr().out), tmp_path / "sweeps" / "lam" / "logs")
    assert main(["sweep", "-c", str(spec), "--aggregate"]) == 0
    rd = json.loads((tmp_path / "sweeps" / "lam" / "rd.json").read_text())
    assert sorted(p["lmbda"] for p in rd["points"]) == [0.001, 0.01] and len(rd["results"]["bpp"]) == 2


def test_a_pipeline_on_two_nodes_trains_with_ddp_over_gloo_and_writes_one_final(slurm_env, tmp_path, shard_dir,
                                                                               eval_dir, capsys):
    from foundation.manifest import read_manifest
    from train import main

    pipe = pipeline_yaml(tmp_path / "p.yaml", shard_dir, eval_dir, finetune=False)
    assert main(["pipeline", "-c", str(pipe), "launcher=slurm", "submit=true", "slurm.nodes=2", *CPU_JOB]) == 0
    run_dir = tmp_path / "runs" / "p"
    resolved = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    assert resolved["launcher"] == "local"
    assert {"trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
            "trainer.accelerator=cpu"} <= set(resolved["overrides"])
    ended(slurm_env, submitted_job(capsys.readouterr().out), run_dir / "logs")
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # two ranks, one per node
    assert read_manifest(run_dir / "codec" / "final", expect_stage="stage1").metrics["val/bpp"] > 0
    assert [p.name for p in run_dir.glob("*/final")] == ["final"]


def test_sigusr1_mid_stage_saves_requeues_and_ends_on_the_uninterrupted_weights(slurm_env, tmp_path, shard_dir,
                                                                               eval_dir, capsys):
    """Two identical jobs side by side (one per node); the first gets SLURM's pre-timeout signal."""
    import time

    from safetensors.torch import load_file

    from train import main

    jobs = {}
    for name in ("straight", "signalled"):
        (tmp_path / name).mkdir()
        pipe = pipeline_yaml(tmp_path / name / "p.yaml", shard_dir, eval_dir, finetune=False)
        spec = yaml.safe_load(pipe.read_text())
        spec["stages"][0]["overrides"] += ["trainer.max_steps=60", "trainer.val_every=60", "trainer.checkpoint_every=1000"]
        pipe.write_text(yaml.safe_dump(spec))
        assert main(["pipeline", "-c", str(pipe), "launcher=slurm", "submit=true", *CPU_JOB]) == 0
        jobs[name] = submitted_job(capsys.readouterr().out)
    stage = tmp_path / "signalled" / "runs" / "p" / "codec"
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size > 200 for p in stage.glob("tb/events*")):  # a few steps logged
        assert time.monotonic() < deadline, slurm_env.job_states(jobs["signalled"])
        time.sleep(0.5)
    slurm_env.run("scancel", "--signal=USR1", jobs["signalled"])
    for name, job in jobs.items():
        ended(slurm_env, job, tmp_path / name / "runs" / "p" / "logs")
    assert "Restarts=1" in slurm_env.run("scontrol", "show", "job", jobs["signalled"]).stdout
    log = "".join(p.read_text() for p in (tmp_path / "signalled" / "runs" / "p" / "logs").glob("*.out"))
    assert "stopped: SIGUSR1: saved" in log and "requeued" in log and "resuming from" in log
    straight, resumed = (load_file(tmp_path / n / "runs" / "p" / "codec" / "final" / "codec.safetensors")
                         for n in ("straight", "signalled"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)

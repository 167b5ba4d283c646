"""Multi-process runs on CPU (gloo): DDP, two torchrun "nodes" on loopback, SIGKILL and re-run."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides
from datamodules.codec_data import CodecDataModule, ImageDataConfig
from foundation.config import load_config
from foundation.manifest import read_manifest
from stages import pipeline
from stages.pipeline import PipelineConfig

pytestmark = pytest.mark.fault

TRAIN = [sys.executable, str(ROOT / "train.py")]
DDP_OVERRIDES = ["trainer.max_steps=8", "trainer.val_every=8", "trainer.checkpoint_every=4", "data.val_max_images=2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(shard_dir, eval_dir, out, *extra):
    return [f"output_root={out}", *tiny_overrides(shard_dir, eval_dir), *DDP_OVERRIDES, *extra]


def test_each_rank_reads_its_own_shards(shard_dir):
    keys = []
    for rank in range(2):
        module = CodecDataModule(ImageDataConfig(train_shards=str(shard_dir), val_dir="unused", crop=64,
                                                 batch_size=2, num_workers=0), seed=0)
        module.trainer = type("T", (), {"global_rank": rank, "world_size": 2, "global_step": 0})()
        batches = iter(module.train_dataloader())
        keys.append({key for _ in range(6) for key in next(batches)["keys"]})
    assert keys[0] and keys[1] and keys[0].isdisjoint(keys[1])


def test_two_process_ddp_trains_and_hands_over_a_manifest(tmp_path, shard_dir, eval_dir):
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run([*TRAIN, "stage1", *overrides(shard_dir, eval_dir, tmp_path, "trainer.strategy=ddp",
                                                          "trainer.devices=2")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "default" / "stage1" / "final")
    assert 0 < manifest.metrics["val/bpp"] < 10
    ckpt = torch.load(tmp_path / "default" / "stage1" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8


def test_two_torchrun_nodes_on_loopback_train_together(tmp_path, shard_dir, eval_dir):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "train.py"), "stage1",
                               *overrides(shard_dir, eval_dir, tmp_path, "trainer.strategy=ddp", "trainer.num_nodes=2",
                                          "trainer.devices=1")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for rank in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world_size=2" in "".join(outputs) or "MEMBER: 2/2" in "".join(outputs)
    assert read_manifest(tmp_path / "default" / "stage1" / "final").metrics["val/bpp"] > 0


def test_sigkill_mid_stage_then_the_same_command_finishes_with_identical_weights(tmp_path, shard_dir, eval_dir):
    def write(run):
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump({
            "run": run, "output_root": str(tmp_path / "runs"),
            "overrides": [*tiny_overrides(shard_dir, eval_dir), "trainer.max_steps=80", "trainer.val_every=80",
                          "trainer.checkpoint_every=5", "data.val_max_images=1"],
            "stages": [{"name": "codec", "kind": "stage1"}]}))
        return path

    straight = pipeline.run(load_config(PipelineConfig, [write("straight")]))[0]

    command = [*TRAIN, "pipeline", "-c", str(write("killed"))]
    stage_dir = tmp_path / "runs" / "killed" / "codec"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (stage_dir / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (stage_dir / "final").exists()
    killed_at = torch.load(stage_dir / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < killed_at < 80

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    a, b = load_file(straight / "codec.safetensors"), load_file(stage_dir / "final" / "codec.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("garbage", [b"", b'{"stage": "stage1", "codec": {'])
def test_a_half_written_final_is_not_taken_as_finished(tmp_path, garbage, shard_dir, eval_dir):
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump({"run": "p", "output_root": str(tmp_path / "runs"),
                                    "overrides": tiny_overrides(shard_dir, eval_dir),
                                    "stages": [{"name": "codec", "kind": "stage1"}]}))
    final = tmp_path / "runs" / "p" / "codec" / "final"
    final.mkdir(parents=True)
    (final / "manifest.json").write_bytes(garbage)
    assert not pipeline.finished(pipeline.plan(load_config(PipelineConfig, [spec]))[0])


def test_a_rank_whose_peer_never_comes_fails_within_the_configured_timeout_naming_it(tmp_path, shard_dir, eval_dir):
    """Rank 0 of two, alone: it must give up after trainer.ddp_timeout_s, not torch's 30 minutes."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}
    start = time.monotonic()
    result = subprocess.run([*TRAIN, "stage1", *overrides(shard_dir, eval_dir, tmp_path, "trainer.strategy=ddp",
                                                          "trainer.num_nodes=2", "trainer.devices=1",
                                                          "trainer.ddp_timeout_s=5")],
                            capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: a peer died or could not be reached (master 127.0.0.1:"), last
    assert "trainer.ddp_timeout_s=5 s" in last
    assert time.monotonic() - start < 120

"""The project installs as a wheel, not only editable: built from a clean export of the tree (stale
modules in an ignored build/ cannot hide a bad package list), installed into a fresh venv that
borrows the already installed dependencies, and run from another folder."""
import subprocess
import sys
import sysconfig
import venv

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.chain, pytest.mark.timeout(300)]


def export_tree(dest):
    """Tracked and untracked-but-not-ignored files, as a fresh clone with this change would hold."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())


def test_a_wheel_in_a_fresh_venv_runs_the_cli_outside_the_repo(tmp_path):
    export = tmp_path / "export"
    export_tree(export)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(export)], check=True, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from the test's own environment, appended after the fresh site-packages
    # (a plain path entry: its editable-install hooks stay inactive, so only the wheel provides our code).
    (tmp_path / "venv" / site.split(str(env_dir) + "/", 1)[1] / "deps.pth").write_text(sysconfig.get_paths()["purelib"])
    wheel = next(dist.glob("diffcodec-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = env_dir / "bin" / "diffcodec"
    helped = subprocess.run([cli, "--help"], cwd=elsewhere, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "quickstart" in helped.stdout and "evaluate" in helped.stdout
    printed = subprocess.run([cli, "quickstart", "--print-config"], cwd=elsewhere, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    # The preset travelled as package data and was merged: its values, not the schema's defaults.
    assert "model: tiny-pixel" in printed.stdout and "workdir: checkpoints/quickstart" in printed.stdout
    where = subprocess.run([python, "-c", "import stages, evaluation, foundation; print(stages.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where

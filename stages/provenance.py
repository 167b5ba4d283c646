"""What produced a run: the resolved config, the git commit (and diff), the installed packages."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from foundation.config import to_yaml
from foundation.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The commit of this checkout, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    try:
        sha = _git("rev-parse", "HEAD").strip()
        return sha + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pip_freeze() -> str:
    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    return "\n".join(dict.fromkeys(names)) + "\n"


def write_provenance(run_dir: str | Path, cfg: Any) -> None:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    commit = git_commit()
    diff = ""
    if commit.endswith("-dirty"):
        try:
            diff = _git("diff", "HEAD")
        except (OSError, subprocess.CalledProcessError):
            diff = ""
    atomic_write_text(run_dir / "git.txt", f"commit: {commit}\n" + (f"\n{diff}" if diff else ""))
    atomic_write_text(run_dir / "pip-freeze.txt", pip_freeze())


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                          timeout=30).stdout

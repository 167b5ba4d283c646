"""A finished stage hands over ``final/``: weights (safetensors), the resolved config and
``manifest.json``. The next stage trusts a ``final/`` only after :func:`read_manifest` checks it."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from foundation.files import sha256_file

# 2: per-stage ``params`` (what the stage trained with) instead of stage 1's lmbda/distortion.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A stage output that is missing, half-written, tampered with or of the wrong kind."""


@dataclass
class Manifest:
    stage: str
    """Which stage wrote it: stage1, stage2-llicm, ..."""
    weights: dict[str, str]
    """File name in final/ → sha256 of its bytes."""
    params: dict = field(default_factory=dict)
    """What this stage trained with: its module's config (that schema's keys), which rebuilds the
    model. Version-1 manifests held only stage 1's lmbda and distortion here (the rest is in config.yaml)."""
    codec: Optional[dict] = None
    """The codec's architecture and sizes ({architecture, N, M}) when the model has one: the codec
    commands and init_from checks read it."""
    metrics: dict[str, float] = field(default_factory=dict)
    parent: Optional[str] = None
    """The manifest this stage was initialised from (absolute path), if any."""
    parent_weights: dict[str, str] = field(default_factory=dict)
    git_commit: str = "unknown"
    created_utc: str = ""
    format_version: int = FORMAT_VERSION


def write_final(final_dir: str | Path, manifest: Manifest, writers: dict[str, Callable[[Path], None]],
                extra_text: dict[str, str] | None = None) -> Path:
    """Write every file into a temporary sibling folder, hash it, then swap it in with one rename,
    so a crash leaves either the old ``final/`` or the new one, never a mix."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=".final-"))
    try:
        for name, write in writers.items():
            write(staging / name)
            manifest.weights[name] = sha256_file(staging / name)
        for name, text in (extra_text or {}).items():
            (staging / name).write_text(text)
        manifest.created_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
        if final_dir.exists():
            old = final_dir.with_name(f".old-{final_dir.name}-{time.time_ns()}")
            final_dir.rename(old)
            staging.rename(final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final_dir


def manifest_path(path: str | Path) -> Path:
    """Accept a ``final/`` folder, a stage folder holding ``final/``, or the manifest file itself."""
    path = Path(path)
    for candidate in (path, path / MANIFEST, path / "final" / MANIFEST):
        if candidate.is_file():
            return candidate
    raise ManifestError(f"no {MANIFEST} at {path} (expected a stage's final/ folder)")


def read_manifest(path: str | Path, expect_stage: str | None = None, verify: bool = True) -> Manifest:
    """Load and validate: known format, expected stage, and every weights file present with its sha256."""
    path = manifest_path(path)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") == 1:
            raw["params"] = {"lmbda": raw.pop("lmbda"), "distortion": raw.pop("distortion")}
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
        raise ManifestError(f"{path} is not a valid manifest: {err}") from None
    if manifest.format_version not in READABLE_VERSIONS:
        raise ManifestError(f"{path}: manifest format {manifest.format_version}, this code reads {READABLE_VERSIONS}")
    if expect_stage is not None and manifest.stage != expect_stage:
        raise ManifestError(f"{path} was written by {manifest.stage}, expected {expect_stage}")
    if verify:
        for name, digest in manifest.weights.items():
            file = path.parent / name
            if not file.is_file():
                raise ManifestError(f"{path}: weights file {name} is missing")
            if sha256_file(file) != digest:
                raise ManifestError(f"{path}: sha256 of {name} does not match the manifest (changed or corrupt)")
    return manifest

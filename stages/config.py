"""Where a stage runs and what it starts from: the fields every stage schema adds to the schemas of
the modules it builds (the loader, the trainer settings and ConfigError live in foundation.config)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class StageConfig:
    """Where a stage runs and what it starts from; every stage's schema extends it."""

    run: str = "default"
    """Run name: outputs go to <output_root>/<run>/<name>/."""
    output_root: str = "checkpoints"
    """Folder holding every run."""
    name: str = "stage"
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    init_from: Optional[str] = None
    """A previous stage's final/ to start from (weights only; resume uses this stage's own last.ckpt)."""

    @property
    def stage_dir(self) -> Path:
        return Path(self.output_root) / self.run / self.name

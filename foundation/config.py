"""Typed configs: one dataclass schema per stage (composed of the schemas of the modules it builds); YAML presets and ``key=value`` overrides only
change it, so an unknown key or a wrong type fails here, naming the key, before any model is built.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; its message is one line that names the offending key."""


# Trainer settings that change how a stage runs, not what it computes: a finished stage is not
# out of date because it would now run on more devices or without a progress bar.
LAUNCH_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "progress_bar", "log_every", "ddp_timeout_s")


PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class TrainerConfig:
    """How Lightning runs a stage; launch mode (local, torchrun, SLURM) is only these fields."""

    max_steps: int = 2000
    """Training steps (batches per rank); the LR schedule spans exactly these."""
    val_every: int = 500
    """Validate (estimated and real-bitstream bpp) every this many steps, and at the end."""
    checkpoint_every: int = 250
    """Write last.ckpt (full trainer state, for resume) every this many steps."""
    log_every: int = 50
    """Log training scalars every this many steps."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: str = "auto"
    """Devices per node: auto, a count, or a list like '0,1'."""
    num_nodes: int = 1
    """Nodes in a multi-node job (torchrun or SLURM)."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, ..."""
    precision: str = "32-true"
    """Lightning precision: 32-true or bf16-mixed (fp16 loss scaling would not reach the entropy
    models' auxiliary optimizer, which every stage steps by hand)."""
    seed: int = 0
    """Seed of everything random: weights, data order, crops, quantisation noise."""
    progress_bar: bool = True
    """Show a progress bar (switch off for batch jobs whose logs are files)."""
    ddp_timeout_s: int = 600
    """Under DDP, a rank whose peer died or which cannot reach the master fails after this many
    seconds (rendezvous and every collective) instead of torch's 30 minutes."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "val_every", "checkpoint_every", "log_every", "ddp_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"trainer.{name} must be positive, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {PRECISIONS} (fp16 loss scaling would not reach "
                              f"the auxiliary optimizer), got '{self.precision}'")


@dataclass
class ModuleConfig:
    """What every trained module reads of how it is run (its LR schedule spans trainer.max_steps,
    its noise is seeded by trainer.seed), so that a model rebuilds from its manifest alone."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def load_config(schema: type[T], yaml_files: Sequence[str | Path | dict] = (), overrides: Sequence[str] = (),
                allow_missing: bool = False) -> T:
    """Merge YAML presets (files or dicts), then ``key=value`` overrides, onto ``schema`` and return
    the typed object; with ``allow_missing``, the merged OmegaConf config, required values left ``???``
    and no cross-field checks run (what ``--print-config`` shows)."""
    layers = []
    for path in yaml_files:
        if isinstance(path, dict):
            layers.append(OmegaConf.create(path))
            continue
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers, OmegaConf.from_dotlist(list(overrides)))
        if allow_missing:
            return merged
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required value: {missing[0]}")
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except ConfigKeyError as err:
        raise ConfigError(f"unknown config key '{err.full_key}'") from None
    except MissingMandatoryValue as err:
        raise ConfigError(f"missing required value: {err.full_key}") from None
    except ValidationError as err:
        raise ConfigError(f"wrong type for '{err.full_key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config error at '{getattr(err, 'full_key', '?')}': {_first_line(str(err))}") from None
    except ValueError as err:  # a schema's __post_init__ cross-field check
        raise ConfigError(_first_line(str(err))) from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def section(cfg: Any, schema: type) -> dict:
    """The part of ``cfg`` (a schema composed of ``schema`` and more) that ``schema`` declares."""
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in to_dict(cfg).items() if k in names}


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf of ``schema``: the ``--help`` text of a stage."""
    rows = []
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            rows.extend(describe(f.default_factory, key + "."))
            continue
        if f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)" if f.default is dataclasses.MISSING or f.default == "???" else repr(f.default)
        rows.append((key, default, docs.get(f.name, "")))
    return rows


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after a field), which are the fields' documentation."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text

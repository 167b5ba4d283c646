import argparse
import dataclasses
import typing

import pytest

from foundation.config import ConfigError, describe, field_docs, load_config
from stages.stage1 import Stage1Config
from train import main

pytestmark = pytest.mark.unit

REQUIRED = ["data.train_shards=/s", "data.val_dir=/v"]


def test_yaml_then_overrides_merge_onto_the_schema(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lmbda: 0.013\ncodec:\n  N: 64\n")
    cfg = load_config(Stage1Config, [preset], [*REQUIRED, "codec.N=96", "trainer.max_steps=7"])
    assert (cfg.lmbda, cfg.codec.N, cfg.trainer.max_steps, cfg.codec.M) == (0.013, 96, 7, 192)
    assert isinstance(cfg, Stage1Config)


@pytest.mark.parametrize("overrides, message", [
    (["codec.width=3"], "unknown config key 'codec.width'"),
    (["trainer.max_steps=many"], "wrong type for 'trainer.max_steps'"),
    (["data.crop=100"], "data.crop must be a multiple of 64"),
    (["distortion=l1"], "distortion must be mse or ms-ssim"),
    (["distortion=ms-ssim", "data.crop=128"], "data.crop must be at least 192"),
    (["trainer.precision=16-mixed"], "trainer.precision must be one of"),
    (["lmbda"], "not of the form key=value"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage1Config, overrides=[*REQUIRED, *overrides])


def test_stage2_refuses_fp16_too_its_codec_has_the_same_auxiliary_optimizer():
    from stages.stage2_llicm import Stage2LLICMConfig

    with pytest.raises(ConfigError, match="trainer.precision must be one of"):
        load_config(Stage2LLICMConfig, overrides=["init_from=/f", "prior.model=m", "clip_model=c", *REQUIRED,
                                                  "trainer.precision=16-mixed"])


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match="missing required value: data.val_dir"):
        load_config(Stage1Config, overrides=["data.train_shards=/s"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(Stage1Config, [preset], REQUIRED)


def test_cli_config_error_is_one_line_and_exit_status_2(capsys):
    assert main(["stage1", *REQUIRED, "trainer.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown config key 'trainer.bogus'"


def test_print_config_shows_the_resolved_values(capsys):
    assert main(["stage1", "--print-config", *REQUIRED, "lmbda=0.0483"]) == 0
    assert "lmbda: 0.0483" in capsys.readouterr().out


def cli_schemas() -> dict[str, type]:
    from train import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: sub.get_default("schema") for name, sub in commands.items() if sub.get_default("schema")}


def undocumented(schema: type, prefix: str = "") -> list[str]:
    """Every field of the schema and of the schemas nested in it (lists of them too) without a docstring."""
    missing = []
    hints = typing.get_type_hints(schema)
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        if dataclasses.is_dataclass(inner):
            missing += undocumented(inner, f"{prefix}{f.name}.")
        elif not docs.get(f.name):
            missing.append(prefix + f.name)
    return missing


def test_help_lists_every_key_with_its_doc():
    rows = {key: doc for key, _, doc in describe(Stage1Config)}
    assert "optim.aux_lr" in rows and "quantiles" in rows["optim.aux_lr"]
    schemas = cli_schemas()
    assert {"stage1", "stage2-llicm", "quickstart", "pipeline", "sweep", "evaluate", "evaluate-judge"} <= set(schemas)
    assert {name: undocumented(schema) for name, schema in schemas.items()} == {name: [] for name in schemas}


def test_the_docstring_check_sees_an_undocumented_nested_field():
    @dataclasses.dataclass
    class Inner:
        documented: int = 1
        """Here."""
        bare: int = 2

    @dataclasses.dataclass
    class Outer:
        items: list[Inner] = dataclasses.field(default_factory=list)
        """Some."""

    assert undocumented(Outer) == ["items.bare"]


def test_print_config_shows_the_template_with_required_values_unset(capsys):
    assert main(["stage1", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "train_shards: ???" in out and "val_dir: ???" in out
    assert main(["stage2-llicm", "--print-config"]) == 0  # init_from is checked only when it would run
    assert "clip_model: ???" in capsys.readouterr().out
    assert main(["stage1"]) == 2
    assert capsys.readouterr().err.strip() == "error: missing required value: data.train_shards"

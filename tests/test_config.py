"""Config: strict typed loading, --set overrides, and one-line errors before any work (nothing written)."""
import pathlib
import subprocess
import sys

import pytest

from lctrain.config import ConfigError, RunConfig, dump_config, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_defaults_and_yaml_roundtrip(tmp_path):
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert config.model.pattern == "G-S-M-B-W-"
    assert config.deepspeed.zero_stage == 2
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


def test_overrides_are_typed():
    c = load_config(None, ["train.lr=1e-3", "model.attention.window=64", "data.inputs=[a.txt, b.jsonl]",
                           "model.tie_embeddings=false"])
    assert c.train.lr == 1e-3 and isinstance(c.train.lr, float)
    assert c.model.attention.window == 64
    assert c.data.inputs == ["a.txt", "b.jsonl"]
    assert c.model.tie_embeddings is False


@pytest.mark.parametrize("override, words", [
    ("model.pattern=G-X", ["model.pattern", "'X'", "allowed"]),
    ("train.lr=fast", ["train.lr", "number"]),
    ("train.steps=1.5", ["train.steps", "integer"]),
    ("model.hidden=3", ["model.hidden", "allowed"]),
    ("data.seq_len=100", ["data.seq_len", "divisible"]),
    ("parallel.context_parallel_size=3", ["data.seq_len", "context_parallel_size"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "one of"]),
    ("train.precision=fp8", ["train.precision", "one of"]),
    ("model.gated_deltanet.num_value_heads=3", ["num_value_heads", "multiple"]),
    ("train.min_lr=1", ["min_lr"]),
    ("checkpoint.resume=/no/such/dir", ["checkpoint.resume"]),
    ("model.attention.window=0", ["window"]),
    ("train.activation_checkpointing_skip=Z", ["train.activation_checkpointing_skip", "'Z'", "allowed"]),
    ("nonsense", ["--set", "dotted.key=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pattern: G-\n  layers: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.layers'"):
        load_config(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="'model'"):
        load_config(bad)
    bad.write_text("model: {pattern: 'G-'\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), RunConfig), path


@pytest.mark.parametrize("command", ["train", "train-tokenizer", "prepare-data"])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, command):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lctrain.cli", command, "--config", str(ROOT / "configs" / "demo.yaml"),
                             "--set", f"run_dir={run_dir}", "--set", "model.pattern=G?"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("lctrain: error:") and "model.pattern" in lines[0], result.stderr
    assert not run_dir.exists()


def test_train_without_prepared_data_fails_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lctrain.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                             "--set", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train-tokenizer" in result.stderr and not run_dir.exists()


def test_readme_documents_every_config_key():
    import dataclasses
    import typing

    readme = (ROOT / "README.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            yield from keys(tp, prefix + f.name + ".") if dataclasses.is_dataclass(tp) else [prefix + f.name]

    missing = [k for k in keys(RunConfig) if f"`{k}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"

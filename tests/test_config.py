"""Typed configs: presets load, overrides apply, bad values fail naming field, value and choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from react_ray.cli import STAGES, main
from react_ray.config import ConfigError, DemoConfig, GenerateConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "jobs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates_and_names_its_launch_command(preset):
    """Presets are named STAGE[_variant].yaml; line 1 is the command that launches them."""
    stage = preset.stem.split("_")[0]
    config = load_config(STAGES[stage].config_type, str(preset))
    assert config.output if stage != "serve" else config.retrieval or config.zeroshot
    first = preset.read_text().splitlines()[0]
    assert (
        first.startswith(("# react-ray ", "# ray job submit"))
        and f"--config jobs/presets/{preset.name}" in first
    )
    assert f"jobs/{stage}.py" in preset.read_text() or first.startswith(f"# react-ray {stage} ")


def test_overrides_apply_with_yaml_types(tmp_path):
    config = load_config(
        GenerateConfig, None, ["corpus.num_shards=7", "corpus.formats=[parquet]", "output=s3://b/c"]
    )
    assert (config.corpus.num_shards, config.corpus.formats, config.output) == (
        7,
        ["parquet"],
        "s3://b/c",
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "corpus.num_shards=0",
            r"corpus.num_shards: got 0; Input should be greater than or equal to 1",
        ),
        (
            "corpus.formats=[tfrecord]",
            r"corpus.formats.0: got 'tfrecord'; Input should be 'webdataset', 'parquet' or "
            r"'laion-metadata'",
        ),
        ("corpus.image_size=big", r"corpus.image_size: got 'big'; Input should be a valid integer"),
        ("corpus.shards=3", r"corpus.shards: unknown field"),
        (
            "tuning_mode=half",
            r"tuning_mode: got 'half'; Input should be 'gated-image', 'locked-text' or 'full'",
        ),
    ],
)
def test_invalid_values_name_field_value_and_allowed(override, message):
    config_type = DemoConfig if override.startswith("tuning_mode") else GenerateConfig
    with pytest.raises(ConfigError, match=message):
        load_config(config_type, None, [override])


def test_malformed_override_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(GenerateConfig, None, ["corpus.num_shards"])
    with pytest.raises(ConfigError, match="'output' is a value, not a section"):
        load_config(GenerateConfig, str(ROOT / "jobs/presets/generate_demo.yaml"), ["output.x=1"])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(GenerateConfig, str(bad))


def test_cli_reports_invalid_config(capsys):
    assert main(["generate", "corpus.samples_per_shard=-5"]) == 2
    assert "corpus.samples_per_shard: got -5" in capsys.readouterr().err
    assert main(["train", "data=d", "output=o", "batch_size=10", "workers=3"]) == 2
    assert "batch_size (10) must be a multiple of workers (3)" in capsys.readouterr().err


def test_cli_print_config_resolves_preset_and_overrides(capsys):
    assert (
        main(
            [
                "demo",
                "--config",
                str(ROOT / "jobs/presets/demo.yaml"),
                "model.name=react-micro",
                "--print-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "name: react-micro" in out and "num_shards: 20" in out
    assert (
        main(
            [
                "index",
                "--config",
                str(ROOT / "jobs/presets/index_demo.yaml"),
                "--append",
                "--print-config",
            ]
        )
        == 0
    )
    assert "append: true" in capsys.readouterr().out


def test_job_entrypoint_runs_the_same_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "generate.py"),
            f"output={tmp_path}/c",
            "corpus.num_shards=1",
            "corpus.samples_per_shard=8",
            "corpus.eval_samples_per_class=1",
            "corpus.formats=[parquet]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "corpus: 8 pairs in parquet" in out.stdout
    assert (tmp_path / "c" / "parquet" / "00000.parquet").exists()


# stage -> a config naming every path field it has, relatively (or in another form)
RELATIVE_PATHS = {
    "generate": {"output": "runs/c"},
    "embed": {
        "input": "file://in",
        "output": "out",
        "model": {"checkpoint": "m.pt", "pretrained": "w/o.bin"},
    },
    "index": {"embeddings": "emb", "output": "s3://bucket/index"},
    "retrieve": {
        "task": "t.yaml",
        "image_index": "ii",
        "text_index": "ti",
        "output": "r",
        "decontaminate": {"eval_sets": ["ev", "s3://b/ev"], "embeddings": "ee"},
    },
    "materialize": {"retrieved": "r", "output": "~/shards", "embeddings": "emb"},
    "train": {
        "data": "d",
        "output": "run",
        "model": {"pretrained": "laion2b_s34b_b79k", "name": "ViT-B-32"},
    },
    "evaluate": {
        "eval_set": "ev",
        "task": "t.yaml",
        "output": "e",
        "training_set": "r",
        "models": {"base": {"checkpoint": "file:///abs/b.pt"}},
    },
    "serve": {
        "retrieval": {"indices": {"demo": {"image": "ii", "text": "ti"}}},
        "zeroshot": {"models": {"m": {"checkpoint": "m.pt"}}, "tasks": {"shapes": "t.yaml"}},
    },
    "demo": {"output": "runs/demo"},
}


@pytest.mark.parametrize("stage", RELATIVE_PATHS)
def test_every_path_field_is_resolved_against_the_current_directory_where_configs_load(
    stage, tmp_path, monkeypatch
):
    """Ray Train, Ray Data workers and Serve replicas run in other directories (and Ray Train
    refuses a relative storage path): local paths become absolute once, when the config is built."""
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(RELATIVE_PATHS[stage]))
    config = load_config(STAGES[stage].config_type, "preset.yaml").model_dump()

    def paths(given, built, where=""):
        if isinstance(given, dict):
            for key, value in given.items():
                yield from paths(value, built[key], f"{where}.{key}")
        elif isinstance(given, list):
            for i, value in enumerate(given):
                yield from paths(value, built[i], f"{where}.{i}")
        else:
            yield where, given, built

    for where, given, built in paths(RELATIVE_PATHS[stage], config):
        if given.startswith("s3://") or where.endswith((".name",)) or given == "laion2b_s34b_b79k":
            assert built == given, where  # URIs and tags as given
        elif given.startswith("~"):
            assert built == str(Path.home() / given[2:]), where
        else:
            assert (
                built == str(tmp_path / given.removeprefix("file://"))
                if not given.startswith("file:///")
                else built == given.removeprefix("file://")
            ), where

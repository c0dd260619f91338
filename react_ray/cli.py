"""``react-ray STAGE [--config preset.yaml] [key.sub=value ...]``: one subcommand per stage.

Each stage takes a YAML preset (``jobs/presets/``) plus overrides, validates it into the
stage's config type, and runs. The same entry serves ``python jobs/<stage>.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import get_type_hints

from react_ray.config import (
    ConfigError,
    DemoConfig,
    ElevaterConfig,
    EmbedConfig,
    EvaluateConfig,
    GenerateConfig,
    IndexConfig,
    MaterializeConfig,
    RetrieveConfig,
    TrainConfig,
    load_config,
)


@dataclass(frozen=True)
class Stage:
    help: str
    config_type: type
    run: Callable  # run(config) -> exit code


def _run_generate(config: GenerateConfig) -> int:
    from react_ray.synthetic.corpus import generate_corpus

    print(generate_corpus(config))
    return 0


def _run_embed(config: EmbedConfig) -> int:
    from react_ray.jobs.embed import run_embedding

    print(run_embedding(config))
    return 0


def _run_index(config: IndexConfig) -> int:
    from react_ray.jobs.index import append_to_index, build_index

    (append_to_index if config.append else build_index)(config)
    return 0


def _run_retrieve(config: RetrieveConfig) -> int:
    from react_ray.jobs.retrieve import run_retrieval

    run_retrieval(config)
    return 0


def _run_materialize(config: MaterializeConfig) -> int:
    from react_ray.jobs.materialize import run_materialize

    run_materialize(config)
    return 0


def _run_train(config: TrainConfig) -> int:
    from react_ray.jobs.train import run_training

    print(run_training(config))
    return 0


def _run_evaluate(config: EvaluateConfig) -> int:
    from react_ray.jobs.evaluate import run_evaluation

    print(run_evaluation(config))
    return 0


def _run_elevater(config: ElevaterConfig) -> int:
    from react_ray.jobs.evaluate import run_elevater

    run_elevater(config)
    return 0


def _run_demo(config: DemoConfig) -> int:
    from react_ray.demo import run_demo

    return run_demo(config)


LIBRARY_STAGES: dict[str, Stage] = {
    "generate": Stage(
        "write the synthetic LAION-style corpus and eval set", GenerateConfig, _run_generate
    ),
    "embed": Stage("embed image-text shards with OpenCLIP on Ray Data", EmbedConfig, _run_embed),
    "index": Stage("build sharded FAISS indices on Ray", IndexConfig, _run_index),
    "retrieve": Stage(
        "retrieve a task's training set from class names", RetrieveConfig, _run_retrieve
    ),
    "materialize": Stage(
        "write the retrieved pairs as labeled training shards", MaterializeConfig, _run_materialize
    ),
    "train": Stage(
        "REACT gated-image / locked-text tuning (or pre-training) on Ray Train",
        TrainConfig,
        _run_train,
    ),
    "evaluate": Stage(
        "zero-shot evaluation of several models in one table", EvaluateConfig, _run_evaluate
    ),
    "elevater": Stage(
        "zero-shot on ELEVATER's 20 sets (REACT's benchmark), one table",
        ElevaterConfig,
        _run_elevater,
    ),
    "demo": Stage("run the end-to-end demo on generated data", DemoConfig, _run_demo),
}


def registered_stages() -> dict[str, Stage]:
    """Stages that installed packages register in the entry-point group ``react_ray.stages``: a
    function ``run(config: SomeConfig) -> int`` whose docstring's first line is its help.
    ``serve_apps`` registers ``serve`` this way, so the library never imports the apps."""
    stages = {}
    for entry in entry_points(group="react_ray.stages"):
        run = entry.load()
        help_line = (run.__doc__ or entry.name).strip().splitlines()[0]
        stages[entry.name] = Stage(help_line, get_type_hints(run)["config"], run)
    return stages


STAGES: dict[str, Stage] = LIBRARY_STAGES | registered_stages()


def _list_models() -> int:
    from react_ray.models import TINY_MODELS, available_models

    for name in available_models():
        print(f"{name}{'  (react-ray test/demo config)' if name in TINY_MODELS else ''}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="react-ray", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        sub = commands.add_parser(name, help=stage.help)
        sub.add_argument(
            "--config", help="YAML preset (local path or s3://); defaults when omitted"
        )
        sub.add_argument(
            "overrides", nargs="*", metavar="key.sub=value", help="override config fields"
        )
        sub.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
        if name == "index":
            sub.add_argument("--append", action="store_true", help="same as append=true")
    commands.add_parser("models", help="list the model names build_model accepts")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage == "models":
        return _list_models()
    stage = STAGES[args.stage]
    overrides = args.overrides + (["append=true"] if getattr(args, "append", False) else [])
    try:
        config = load_config(stage.config_type, args.config, overrides)
    except ConfigError as error:
        print(f"react-ray {args.stage}: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        from react_ray.config import dump_config

        print(dump_config(config), end="")
        return 0
    from react_ray.leases import LeaseHeld

    try:
        return stage.run(config)
    except LeaseHeld as refused:  # another run writes this output: a refusal, not a crash
        print(f"react-ray {args.stage}: {refused}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

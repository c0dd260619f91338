"""``react-ray STAGE [--config preset.yaml] [key.sub=value ...]``: one subcommand per stage.

Each stage takes a YAML preset (``jobs/presets/``) plus overrides, validates it into the
stage's config type, and runs. The same entry serves ``python jobs/<stage>.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from react_ray.config import (
    ConfigError,
    DemoConfig,
    EmbedConfig,
    GenerateConfig,
    IndexConfig,
    MaterializeConfig,
    RetrieveConfig,
    load_config,
)


@dataclass(frozen=True)
class Stage:
    help: str
    config_type: type | None = None
    run: Callable | None = None  # run(config) -> exit code
    pending_issue: int | None = None  # not built yet: which issue tracks it


def _run_generate(config: GenerateConfig) -> int:
    from react_ray.data.synthetic import generate_corpus

    print(generate_corpus(config))
    return 0


def _run_embed(config: EmbedConfig) -> int:
    from react_ray.embed.pipeline import run_embedding

    print(run_embedding(config))
    return 0


def _run_index(config: IndexConfig) -> int:
    from react_ray.index.build import build_index

    build_index(config)
    return 0


def _run_retrieve(config: RetrieveConfig) -> int:
    from react_ray.retrieve.retrieval import run_retrieval

    run_retrieval(config)
    return 0


def _run_materialize(config: MaterializeConfig) -> int:
    from react_ray.retrieve.materialize import run_materialize

    run_materialize(config)
    return 0


def _run_demo(config: DemoConfig) -> int:
    from react_ray.demo import run_demo

    return run_demo(config)


STAGES: dict[str, Stage] = {
    "generate": Stage("write the synthetic LAION-style corpus and eval set", GenerateConfig, _run_generate),
    "embed": Stage("embed image-text shards with OpenCLIP on Ray Data", EmbedConfig, _run_embed),
    "index": Stage("build sharded FAISS indices on Ray", IndexConfig, _run_index),
    "retrieve": Stage("retrieve a task's training set from class names", RetrieveConfig, _run_retrieve),
    "materialize": Stage("write the retrieved pairs as labeled training shards", MaterializeConfig,
                         _run_materialize),
    "train": Stage("gated-image tuning with Ray Train", pending_issue=6),
    "evaluate": Stage("zero-shot evaluation, base vs customized", pending_issue=6),
    "serve": Stage("run the retrieval and zero-shot Serve apps", pending_issue=7),
    "demo": Stage("run the end-to-end demo on generated data", DemoConfig, _run_demo),
}


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
        sub.add_argument("--config", help="YAML preset (local path or s3://); defaults when omitted")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    commands.add_parser("models", help="list the model names build_model accepts")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage == "models":
        return _list_models()
    stage = STAGES[args.stage]
    if stage.run is None:
        print(f"react-ray {args.stage}: not built yet (tracked in issue #{stage.pending_issue}); "
              "nothing was run.", file=sys.stderr)
        return 2
    try:
        config = load_config(stage.config_type, args.config, args.overrides)
    except ConfigError as error:
        print(f"react-ray {args.stage}: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        from react_ray.config import dump_config

        print(dump_config(config), end="")
        return 0
    return stage.run(config)


if __name__ == "__main__":
    sys.exit(main())

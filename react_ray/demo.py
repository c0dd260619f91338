"""The end-to-end demo on generated data: every stage, for real, on a private local Ray.

generate two LAION-style corpora -> pre-train a small base CLIP on the first (Ray Train, all
weights) -> embed the second, larger one, which the base never saw, with that base (Ray Data) ->
build sharded image and caption indices ->
retrieve the shapes task from its class names -> materialize the retrieved pairs as training
shards -> REACT gated-image tuning of the base on them (Ray Train) -> zero-shot evaluation of
base vs REACT on the held-out labeled set -> report.html (accuracy table, per-class chart,
training curves, retrieved examples, parameter counts).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from react_ray.config import (
    DecontaminateConfig,
    DemoConfig,
    DemoTrainingConfig,
    EmbedConfig,
    EvaluateConfig,
    GenerateConfig,
    IndexConfig,
    MaterializeConfig,
    RetrieveConfig,
    TrainConfig,
)
from react_ray.evaluate.zeroshot import EvalReport
from react_ray.formats import storage
from react_ray.formats.retrieved_set import pairs_uri
from react_ray.index.sharded import ShardedIndex
from react_ray.jobs.embed import run_embedding
from react_ray.jobs.evaluate import run_evaluation
from react_ray.jobs.index import build_index
from react_ray.jobs.materialize import run_materialize
from react_ray.jobs.retrieve import run_retrieval
from react_ray.jobs.train import TrainSummary, run_training
from react_ray.models import build_model
from react_ray.models.params import REPORT_HEADERS, parameter_report
from react_ray.report import data_uri, page, png_bytes, pyplot, table
from react_ray.synthetic.corpus import generate_corpus

REPORT_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
TASK = str(Path(__file__).resolve().parent / "resources" / "shapes.yaml")  # shipped in the package
STEPS = 9


def _say(step: int, text: str) -> None:
    print(f"[{step}/{STEPS}] {text}", flush=True)


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _train_config(
    config: DemoConfig, data: str, output: str, mode: str, recipe: DemoTrainingConfig, model
) -> TrainConfig:
    # Two CPUs: one Ray CPU for the worker (torch uses both), the data tasks share the rest.
    return TrainConfig(
        data=data,
        output=output,
        model=model,
        mode=mode,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        threads=2,
        worker={"num_cpus": 1},
        decode={"num_cpus": 0.5},
        cache_decoded=True,
        augment_in_worker=True,
        log_every=25,
        checkpoint_every=max(50, recipe.steps // 3),
        seed=config.seed,
        ray_address=config.ray_address,
        # Not REACT's aug-cfg: 32-pixel images of one shape each keep little after an 8% crop, a
        # flip or
        # RandAugment; the images are decoded to the model's 32 px (REACT: 384). No memory to save.
        augment={
            "scale": (0.8, 1.0),
            "hflip": 0.0,
            "color_jitter": None,
            "auto_augment": None,
            "re_prob": 0.0,
            "decode_short_side": 32,
        },
        grad_checkpointing=False,
        optim={"lr": recipe.lr, "warmup_steps": min(recipe.warmup_steps, recipe.steps // 2)},
    )


def _accuracy_png(report: EvalReport) -> bytes:
    import numpy as np

    plt = pyplot()
    labels = list(report.results)
    x = np.arange(len(report.classnames))
    figure, axis = plt.subplots(figsize=(10, 3.2))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        result = report.results[label]
        axis.bar(
            x + i * width,
            [100 * v for v in result["per_class"]],
            width,
            label=f"{label} (top-1 {100 * result['top1']:.1f}%)",
        )
    axis.set_xticks(x + width * (len(labels) - 1) / 2, report.classnames)
    axis.set_ylabel("top-1 %")
    axis.set_title(f"zero-shot per class on the held-out {report.task} set")
    axis.legend()
    return png_bytes(figure)


MARKER = "demo.json"  # written first: this folder is a demo's, and may be cleared for the next run


def start_fresh(config: DemoConfig) -> None:
    """Every stage resumes what it finds, so a demo over an earlier one would reuse its results:
    clear an earlier demo's folder (known by its marker); refuse any other non-empty folder."""
    output = config.output
    fs, path = storage.filesystem(output)
    if fs.exists(storage.join(path, MARKER)):
        print(f"removing the previous demo run at {output}")
        storage.remove(output, recursive=True)
    elif fs.exists(path) and fs.ls(path):
        raise SystemExit(
            f"react-ray demo: {output} is not empty and holds "
            f"no earlier demo ({MARKER}); choose another output="
        )
    storage.write_text_atomic(storage.join(output, MARKER), config.model_dump_json(indent=1))


def run_demo(config: DemoConfig) -> int:
    start = time.perf_counter()

    def out(*parts):
        return storage.join(config.output, *parts)

    start_fresh(config)
    corpus_dir, base_corpus_dir = out("corpus"), out("base-corpus")
    _say(
        1,
        "generating the base's pre-training corpus -> "
        f"{base_corpus_dir} and the retrieval corpus -> {corpus_dir}",
    )
    print("   ", generate_corpus(GenerateConfig(output=base_corpus_dir, corpus=config.base_corpus)))
    print("   ", generate_corpus(GenerateConfig(output=corpus_dir, corpus=config.corpus)))

    _say(
        2,
        f"pre-training the base CLIP ({config.model.name}, "
        f"all weights) on its own corpus -> {out('base')}",
    )
    base_run = run_training(
        _train_config(
            config,
            storage.join(base_corpus_dir, "webdataset"),
            out("base"),
            "full",
            config.pretrain,
            config.model,
        )
    )
    print("   ", base_run)
    base = config.model.model_copy(update={"checkpoint": storage.join(out("base"), "model.pt")})

    _say(
        3,
        "embedding the retrieval corpus (never seen by "
        f"the base) on a local Ray -> {out('embeddings')}",
    )
    summary = run_embedding(
        EmbedConfig(
            input=storage.join(corpus_dir, "webdataset"),
            output=out("embeddings"),
            model=base,
            batch_size=256,
            decode={"num_cpus": 0.5},
            pool={"num_cpus": 1.5},
            ray_address=config.ray_address,
        )
    )
    print("   ", str(summary).replace("\n", "\n    "))

    _say(
        4,
        "building sharded indices of the image and caption "
        f"embeddings -> {out('index')}, {out('index-text')}",
    )
    for keys, name in (("image", "index"), ("text", "index-text")):
        build_index(
            IndexConfig(
                embeddings=out("embeddings"),
                output=out(name),
                keys=keys,
                num_shards=2,
                memory_budget_gb=1,
                tune_queries=200,
                ray_address=config.ray_address,
            )
        )
    index = ShardedIndex(out("index"), expect_model=config.model.name)
    prompt = "a photo of a red star"
    scores, found = index.search(build_model(base).encode_texts([prompt]).numpy(), 5)
    print(f"    top 5 for {prompt!r}:")
    for score, meta in zip(scores[0], index.lookup(found[0])):
        print(f"      {score:.3f}  {meta['key']}  {meta['caption']}")

    _say(5, f"retrieving the shapes task ({TASK}) -> {out('retrieved')}")
    decontaminate = (
        None
        if config.decontamination_threshold is None
        else DecontaminateConfig(
            eval_sets=[storage.join(corpus_dir, "eval")], threshold=config.decontamination_threshold
        )
    )
    run_retrieval(
        RetrieveConfig(
            task=TASK,
            image_index=out("index"),
            text_index=out("index-text"),
            model=base,
            output=out("retrieved"),
            decontaminate=decontaminate,
            ray_address=config.ray_address,
        )
    )
    if decontaminate:
        print("   ", planted_copies_found(corpus_dir, out("retrieved"), index))
    _say(6, f"materializing the retrieved pairs from the corpus bytes -> {out('train-shards')}")
    run_materialize(
        MaterializeConfig(
            retrieved=out("retrieved"),
            output=out("train-shards"),
            source="corpus",
            embeddings=out("embeddings"),
            resize_mode="no",
            ray_address=config.ray_address,
        )
    )

    _say(
        7, f"REACT {config.tuning_mode} tuning of the base on the retrieved pairs -> {out('react')}"
    )
    react_run = run_training(
        _train_config(
            config, out("train-shards"), out("react"), config.tuning_mode, config.tune, base
        )
    )
    print("   ", react_run)
    react = config.model.model_copy(update={"checkpoint": storage.join(out("react"), "model.pt")})

    _say(8, "zero-shot evaluation of base vs REACT on the held-out labeled set")
    report = run_evaluation(
        EvaluateConfig(
            eval_set=storage.join(corpus_dir, "eval"),
            task=TASK,
            models={"base": base, "react": react},
            output=out("evaluation"),
            training_set=out("retrieved"),
        )
    )
    print("   ", str(report).replace("\n", "\n    "))
    base_top1, react_top1 = (100 * report.results[k]["top1"] for k in ("base", "react"))
    gain = report.gains["react"]
    outcome = (
        "beats"
        if gain["low"] > 0
        else "does NOT beat"
        if gain["high"] < 0
        else "does not clearly beat"
    )
    verdict = (
        f"REACT {config.tuning_mode} {outcome} its base: {gain['gain']:+.2f} points top-1, 95% "
        f"interval [{gain['low']:+.2f}, {gain['high']:+.2f}] ({base_top1:.2f}% -> "
        f"{react_top1:.2f}%, {report.results['base']['n']} held-out images)"
    )
    print("   ", verdict)

    _say(9, "report")
    rows = [
        r.row() for r in (parameter_report(name) for name in (config.model.name, *REPORT_MODELS))
    ]
    print(_format_table(REPORT_HEADERS, rows))
    _write_report(config, report, verdict, base_run, react_run, rows)
    print(f"done in {time.perf_counter() - start:.0f}s; report: {out('report.html')}")
    return 0


def planted_copies_found(corpus_dir: str, retrieved: str, index: ShardedIndex) -> str:
    """How decontamination did on the copies of eval images the generator planted (ground truth)."""
    import pyarrow.parquet as pq

    truth = pq.read_table(
        storage.local_copy(storage.join(corpus_dir, "ground_truth.parquet"))
    ).to_pandas()
    planted = set(truth.loc[truth["planted_from"].notna(), "key"])
    removed = pq.read_table(
        storage.local_copy(storage.join(retrieved, "decontamination.parquet"))
    ).to_pandas()
    removed_keys = {m["key"] for m in index.lookup(removed["id"].to_numpy()) if m}
    kept_keys = set(
        pq.read_table(storage.local_copy(pairs_uri(retrieved)), columns=["key"])
        .column("key")
        .to_pylist()
    )
    caught, missed = len(planted & removed_keys), len(planted & kept_keys)
    return (
        f"planted copies of eval images that retrieval found: {caught + missed}; removed {caught}, "
        f"missed {missed}; other pairs removed (look-alikes the model cannot tell from copies): "
        f"{len(removed_keys - planted)} of {len(removed_keys - planted) + len(kept_keys - planted)}"
    )


def _write_report(
    config: DemoConfig,
    report: EvalReport,
    verdict: str,
    base_run: TrainSummary,
    react_run: TrainSummary,
    parameter_rows: list[list[str]],
) -> None:
    def out(*parts):
        return storage.join(config.output, *parts)

    accuracy_png = _accuracy_png(report)
    storage.write_bytes_atomic(out("accuracy.png"), accuracy_png)
    curves = "".join(
        f"<h3>{title}</h3><img "
        f"src='{data_uri(storage.read_bytes(storage.join(run, 'training.png')), 'image/png')}'>"
        for title, run in (("pre-training the base", out("base")), ("REACT tuning", out("react")))
    )
    body = (
        f"<p><b>{verdict}</b></p>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in report.notes)
        + table(report.headers, report.rows())
        + f"<p><img src='{data_uri(accuracy_png, 'image/png')}'></p>"
        + f"<h2>Training</h2><p>Base: {base_run}.<br>REACT: {react_run}.</p>{curves}"
        + "<h2>Data</h2><p><a href='corpus/preview.html'>corpus preview</a> · "
        + "<a href='retrieved/gallery.html'>retrieved pairs per class</a> · "
        + "<a href='retrieved/decontamination.html'>decontamination</a> · "
        + "<a href='evaluation/evaluation.html'>per-class accuracy</a></p>"
        + "<h2>REACT parameter counts</h2>"
        + table(REPORT_HEADERS, parameter_rows)
    )
    storage.write_text_atomic(
        out("report.html"), page("react-ray demo: REACT vs its base CLIP", body)
    )

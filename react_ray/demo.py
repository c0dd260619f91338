"""The end-to-end demo on generated data. Runs every stage that exists today, for real.

Today: generate the corpus -> embed it on a local Ray (Ray Data, actor pool) -> build a
sharded index and query it with a text prompt -> retrieve the shapes task (parquet, summary,
gallery) -> materialize the pairs as labeled training shards from the corpus bytes -> build the base CLIP and its REACT gated variant and check that they are equal
at step 0 on real corpus images -> parameter report. The base CLIP has random weights until
the training stage exists, so retrieval results are plumbing, not yet meaningful. Training
and evaluation join when they are built.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

from react_ray import storage
from react_ray.config import (
    DemoConfig,
    EmbedConfig,
    GenerateConfig,
    IndexConfig,
    MaterializeConfig,
    RetrieveConfig,
)
from react_ray.data.synthetic import generate_corpus
from react_ray.embed.pipeline import run_embedding
from react_ray.index.build import build_index
from react_ray.index.sharded import ShardedIndex
from react_ray.models import apply_tuning_mode, build_model, react_gated_layers
from react_ray.models.params import REPORT_HEADERS, parameter_report
from react_ray.report import page, table
from react_ray.retrieve.materialize import run_materialize
from react_ray.retrieve.retrieval import run_retrieval

REPORT_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
NEXT_STAGES = "train + evaluate (#6)"
TASK = str(Path(__file__).resolve().parents[1] / "jobs" / "tasks" / "shapes.yaml")


def _eval_images(corpus_dir: str, limit: int) -> list[Image.Image]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(corpus_dir, "eval", "eval-00000.tar")))) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:limit]
        return [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in jpgs]


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def run_demo(config: DemoConfig) -> int:
    start = time.perf_counter()
    corpus_dir = storage.join(config.output, "corpus")
    print(f"[1/7] generating the corpus -> {corpus_dir}")
    print("   ", generate_corpus(GenerateConfig(output=corpus_dir, corpus=config.corpus)))

    embeddings = storage.join(config.output, "embeddings")
    print(f"[2/7] embedding it with {config.model.name} on a local Ray -> {embeddings}")
    summary = run_embedding(EmbedConfig(
        input=storage.join(corpus_dir, "webdataset"), output=embeddings, model=config.model, batch_size=128,
        decode_num_cpus=0.5, pool={"num_cpus": 1.5}, ray_address=config.ray_address))
    print("   ", str(summary).replace("\n", "\n    "))

    index_dir = storage.join(config.output, "index")
    print(f"[3/7] building a sharded index of the image embeddings -> {index_dir}")
    build_index(IndexConfig(embeddings=embeddings, output=index_dir, num_shards=2, memory_budget_gb=1,
                            tune_queries=200, ray_address=config.ray_address))
    index = ShardedIndex(index_dir, expect_model=config.model.name)
    prompt = "a photo of a red star"
    query = build_model(config.model).encode_texts([prompt]).numpy()
    scores, found = index.search(query, 5)
    print(f"    top 5 for {prompt!r} (the demo's CLIP is random until trained, so these are not yet meaningful):")
    for score, meta in zip(scores[0], index.lookup(found[0])):
        print(f"      {score:.3f}  {meta['key']}  {meta['caption']}")

    retrieved = storage.join(config.output, "retrieved")
    print(f"[4/7] retrieving the shapes task ({TASK}) -> {retrieved}")
    run_retrieval(RetrieveConfig(task=TASK, image_index=index_dir, model=config.model, output=retrieved))
    shards = storage.join(config.output, "train-shards")
    print(f"[5/7] materializing the retrieved pairs from the corpus bytes -> {shards}")
    run_materialize(MaterializeConfig(retrieved=retrieved, output=shards, source="corpus", embeddings=embeddings,
                                      resize_mode="no", ray_address=config.ray_address))

    print(f"[6/7] building {config.model.name} and its REACT gated-image variant")
    base = build_model(config.model.model_copy(update={"gated_layers": 0}))
    k = config.model.gated_layers or react_gated_layers(config.model.name)
    gated = build_model(config.model.model_copy(update={"gated_layers": k}))
    gated.model.load_state_dict(base.model.state_dict(), strict=False)  # same base weights
    trainable = apply_tuning_mode(gated.model, config.tuning_mode)
    images = torch.stack([base.preprocess(im) for im in _eval_images(corpus_dir, 32)])
    prompts = ["a photo of a red circle", "a blue star on a striped background"]
    image_gap = (base.encode_images(images) - gated.encode_images(images)).abs().max().item()
    text_gap = (base.encode_texts(prompts) - gated.encode_texts(prompts)).abs().max().item()
    print(f"    gated blocks before image blocks {gated.gated_indices}; {len(trainable)} trainable tensors "
          f"in {config.tuning_mode} mode")
    print(f"    step 0, base vs gated on {len(images)} eval images: max |image feature gap| = {image_gap:.2e}, "
          f"text = {text_gap:.2e} (zero-initialised gates)")

    print("[7/7] REACT parameter report (random weights on the meta device, nothing downloaded)")
    reports = [parameter_report(name) for name in (config.model.name, *REPORT_MODELS)]
    rows = [r.row() for r in reports]
    print(_format_table(REPORT_HEADERS, rows))
    report_uri = storage.join(config.output, "report.html")
    body = (f"<p>Corpus: <a href='corpus/preview.html'>preview</a>. Step-0 feature gap base vs gated: "
            f"image {image_gap:.2e}, text {text_gap:.2e}.</p>" + table(REPORT_HEADERS, rows)
            + f"<p>Next stages, not built yet: {NEXT_STAGES}.</p>")
    storage.write_text_atomic(report_uri, page("react-ray demo", body))
    print(f"done in {time.perf_counter() - start:.1f}s; report: {report_uri}")
    print(f"next, not built yet: {NEXT_STAGES}")
    return 0 if image_gap < 1e-5 and text_gap < 1e-6 else 1

"""GPU embedding check (run only where a GPU is lent): images/s per GPU, end to end from shards.

python jobs/bench_embed_gpu.py [--gpus 1 --shards 8 --rows 2000 --models ViT-B-32 ViT-L-14]

Random weights, fp16 autocast, 256 px JPEG shards generated locally, decoded on CPU tasks and
embedded on one actor per GPU. Compare with clip-retrieval's published figures: about 2,500
images/s per A100 on ViT-B/32 and 312/s on ViT-L/14.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import ray

from react_ray.config import CorpusConfig, EmbedConfig, GenerateConfig, ModelConfig
from react_ray.jobs.embed import run_embedding
from react_ray.ray_utils import start_local
from react_ray.synthetic.corpus import generate_corpus

PUBLISHED = {"ViT-B-32": 2500, "ViT-L-14": 312}  # clip-retrieval, images/s per A100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-embed-gpu-")
    corpus = os.path.join(work, "corpus")
    generate_corpus(
        GenerateConfig(
            output=corpus,
            corpus=CorpusConfig(
                num_shards=args.shards,
                samples_per_shard=args.rows,
                image_size=256,
                eval_samples_per_class=1,
                formats=["webdataset"],
            ),
        )
    )
    start_local()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for model in args.models:
        config = EmbedConfig(
            input=f"{corpus}/webdataset",
            output=os.path.join(work, f"emb-{model}"),
            model=ModelConfig(name=model),
            precision="fp16",
            batch_size=args.batch_size,
            read_block_rows=args.batch_size,
            decode={"num_cpus": 1},
            pool={"min_actors": args.gpus, "max_actors": args.gpus, "num_gpus": 1, "num_cpus": 1},
        )
        summary = run_embedding(config, progress=False)
        per_gpu = summary.this_run_steady_rows_per_s / args.gpus
        print(
            f"{model}: {summary.this_run_rows} pairs, {per_gpu:,.0f} images/s per GPU in steady "
            f"state ({summary.this_run_startup_seconds:.0f}s start-up, {cpus} CPUs decoding); "
            f"clip-retrieval published {PUBLISHED.get(model, '?')}/s per A100"
        )


if __name__ == "__main__":
    main()

"""Autoscaling on a simulated cluster: the same embedding job with one "GPU" node throughout vs one
that grows to three nodes once its first batch is embedded (ray.cluster_utils.Cluster; the GPU
nodes stand in with num_gpus=1 and run the model on CPU). Prints both wall times and the ratio.

    python jobs/bench_cluster.py [--shards 32] [--rows 128] [--model react-tiny]

On a 2-core machine the nodes share the same cores, so the ratio is a floor of what real
nodes give; it shows that the actor pool grows onto nodes that join mid-run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from ray.cluster_utils import Cluster

from react_ray.config import CorpusConfig, EmbedConfig, GenerateConfig, ModelConfig
from react_ray.formats.embedding_set import read_stats, shard_name
from react_ray.jobs.embed import run_embedding
from react_ray.synthetic.corpus import generate_corpus

GPU_NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 200 * 2**20}


def one_run(
    corpus: str, output: str, model: str, grow_to: int, shards: int, batch: int
) -> tuple[float, int]:
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 3,
            "resources": {"cpu_node": 100},
            "object_store_memory": 2**30,
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(**GPU_NODE)
        cluster.wait_for_nodes()
        config = EmbedConfig(
            input=corpus,
            output=output,
            model=ModelConfig(name=model),
            batch_size=batch,
            read_block_rows=batch,
            decode={"num_cpus": 1, "custom": {"cpu_node": 1}},
            pool={
                "num_gpus": 1,
                "num_cpus": 1,
                "device": "cpu",
                "min_actors": 1,
                "max_actors": grow_to,
            },
        )
        job = threading.Thread(target=run_embedding, args=(config,), kwargs={"progress": False})
        start = time.perf_counter()
        job.start()
        # the autoscaler's new nodes, once the pool is busy (added from the main thread)
        if grow_to > 1:
            while job.is_alive() and not any(
                f.endswith(".parquet") for _, _, fs in os.walk(output) for f in fs
            ):
                time.sleep(0.2)
            for _ in range(grow_to - 1):
                cluster.add_node(**GPU_NODE)
        job.join()
        seconds = time.perf_counter() - start
        nodes = set().union(
            *(read_stats(output, shard_name(n)).nodes["embed"] for n in range(shards))
        )
        return seconds, len(nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--model", default="react-tiny")
    parser.add_argument("--grow-to", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        generate_corpus(
            GenerateConfig(
                output=f"{root}/corpus",
                corpus=CorpusConfig(
                    num_shards=args.shards,
                    samples_per_shard=args.rows,
                    image_size=64,
                    eval_samples_per_class=1,
                    formats=["webdataset"],
                ),
            ),
            progress=False,
        )
        fixed, fixed_nodes = one_run(
            f"{root}/corpus/webdataset", f"{root}/fixed", args.model, 1, args.shards, args.batch
        )
        grown, grown_nodes = one_run(
            f"{root}/corpus/webdataset",
            f"{root}/grown",
            args.model,
            args.grow_to,
            args.shards,
            args.batch,
        )
    pairs = args.shards * args.rows
    print(f"\n{pairs:,} pairs, {args.model}, pool min 1 / max {args.grow_to}")
    print(
        f"  one GPU node throughout       {fixed:7.1f} s  "
        f"({pairs / fixed:6.1f} pairs/s, {fixed_nodes} node used)"
    )
    print(
        f"  grows to {args.grow_to} nodes mid-run       {grown:7.1f} s  ({pairs / grown:6.1f} "
        f"pairs/s, {grown_nodes} nodes used)"
    )
    print(f"  speed-up                      {fixed / grown:7.2f}x")


if __name__ == "__main__":
    main()

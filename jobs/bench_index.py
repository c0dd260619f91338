"""Index benchmark: our sharded Ray build against autofaiss, same embeddings, same memory budget.

python jobs/bench_index.py [--vectors 1000000 --dim 128 --budget-mb 160 --autofaiss-python PATH]

autofaiss pins numpy<2 and needs pyarrow<17, and its OPQ code calls faiss with keyword arguments
that faiss 1.15 rejects, so it runs in its own virtual environment with faiss 1.7.4:
    python3 -m venv /tmp/afenv && /tmp/afenv/bin/pip install autofaiss "pyarrow<17"
    "faiss-cpu==1.7.4"
Prints, measured in one run: build wall time ours (1 and 2 Ray workers) / autofaiss, the index
each chose, recall@10 of TEXT queries (caption embeddings against image keys) at equal search
latency, and queries/s. Vectors are clustered (see react_ray.synthetic.embeddings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import faiss
import numpy as np
import ray

from react_ray.config import IndexConfig
from react_ray.formats.embedding_set import column_matrix, committed_files, read_parquet
from react_ray.index.sharded import ShardedIndex, set_search_params
from react_ray.index.tune import exact_ground_truth, knob_for, recall_at_k
from react_ray.jobs.index import build_index
from react_ray.ray_utils import start_local
from react_ray.synthetic.embeddings import write_clustered_embedding_set

AUTOFAISS_SCRIPT = """
import json, sys, time
from autofaiss import build_index
start = time.perf_counter()
key = sys.argv[5] or None  # None: autofaiss chooses, as its users get by default
_, infos = build_index(
    embeddings=sys.argv[1], index_path=sys.argv[2], index_infos_path=sys.argv[3],
    max_index_memory_usage=sys.argv[4], current_memory_available="8G", metric_type="ip",
    index_key=key, save_on_disk=True, verbose=30)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def curve(
    search, queries: np.ndarray, truth: np.ndarray, knob: str | None, values: list[int], set_value
) -> list:
    """(value, recall@10, ms/query, QPS) for each knob value."""
    points = []
    for value in values if knob else [None]:
        if knob:
            set_value(value)
        search(queries[:20])  # warm up
        start = time.perf_counter()
        found = search(queries)
        seconds = time.perf_counter() - start
        points.append(
            (
                value,
                recall_at_k(found, truth),
                1000 * seconds / len(queries),
                len(queries) / seconds,
            )
        )
    return points


def recall_at_latency(points: list, ms: float) -> float:
    """Best recall among settings no slower than ``ms`` (0 when every setting is slower)."""
    return max((p[1] for p in points if p[2] <= ms * 1.05), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--budget-mb", type=int, default=160)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--autofaiss-python", default="/tmp/afenv/bin/python")
    parser.add_argument(
        "--autofaiss-timeout", type=int, default=900, help="seconds before giving up on autofaiss"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="Ray worker CPUs to build with"
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-index-")
    emb = os.path.join(work, "emb")
    t = time.perf_counter()
    write_clustered_embedding_set(
        emb, args.files, args.vectors // args.files, dim=args.dim, num_clusters=1000
    )
    print(
        f"wrote {args.vectors:,} x {args.dim} clustered embeddings in "
        f"{time.perf_counter() - t:.0f}s"
    )
    _, files = committed_files(emb)
    npy = os.path.join(work, "npy")
    os.makedirs(npy)
    for i, f in enumerate(files):  # autofaiss reads .npy files; the same vectors, in the same order
        np.save(
            os.path.join(npy, f"emb_{i:04d}.npy"),
            column_matrix(read_parquet(f.uri, ["img_emb"]), "img_emb").astype(np.float32),
        )
    all_ids = np.concatenate([read_parquet(f.uri, ["id"])["id"].to_numpy() for f in files])

    queries = np.concatenate(
        [column_matrix(read_parquet(f.uri, ["txt_emb"]), "txt_emb")[:5] for f in files]
    )
    queries = np.ascontiguousarray(queries[: args.queries], np.float32)
    truth = exact_ground_truth(queries, files, "img_emb", 10)

    results = {}
    for workers in args.workers:
        start_local(workers)
        out = os.path.join(work, f"ours-{workers}")
        start = time.perf_counter()
        manifest = build_index(
            IndexConfig(
                embeddings=emb,
                output=out,
                memory_budget_gb=args.budget_mb / 1024,
                num_shards=2,
                files_per_task=10,
                train_samples=100_000,
                tune_queries=200,
                target_recall=0.9,
            ),
            progress=False,
        )
        results[workers] = (time.perf_counter() - start, manifest)
        ray.shutdown()
    workers = max(args.workers)
    ours_seconds, manifest = results[workers]
    index = ShardedIndex(os.path.join(work, f"ours-{workers}"))
    knob = knob_for(manifest.factory)
    ours = curve(
        lambda q: index.search(q, 10)[1],
        queries,
        truth,
        knob and knob[0],
        knob[1] if knob else [],
        lambda v: index.set_params({knob[0]: v}),
    )
    print(
        f"\nours: {manifest.factory} in 2 shards; build "
        + ", ".join(
            f"{s:.1f}s with {w} Ray worker(s) ({manifest_.seconds})"
            for w, (s, manifest_) in results.items()
        )
    )
    print_curve("ours", ours)

    for label, key in (
        ("autofaiss, same index type", manifest.factory),
        ("autofaiss, its own choice", ""),
    ):
        af_index, af_infos = os.path.join(work, "af.index"), os.path.join(work, "af.json")
        try:
            run = subprocess.run(
                [
                    args.autofaiss_python,
                    "-c",
                    AUTOFAISS_SCRIPT,
                    npy,
                    af_index,
                    af_infos,
                    f"{args.budget_mb}MB",
                    key,
                ],
                capture_output=True,
                text=True,
                timeout=args.autofaiss_timeout,
            )
        except subprocess.TimeoutExpired:
            print(
                f"{label}: did not finish within {args.autofaiss_timeout}s "
                f"(ours: {ours_seconds:.1f}s, so ours / autofaiss < "
                f"{ours_seconds / args.autofaiss_timeout:.2f})"
            )
            continue
        if run.returncode != 0:
            print(f"{label}: failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        af_seconds = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
        infos = json.load(open(af_infos))
        af = faiss.read_index(af_index)
        af_factory = infos.get("index_key", key)
        af_knob = knob_for(af_factory)
        theirs = curve(
            lambda q, af=af: all_ids[np.maximum(af.search(q, 10)[1], 0)],
            queries,
            truth,
            af_knob and af_knob[0],
            af_knob[1] if af_knob else [],
            lambda v, af=af, knob=af_knob: set_search_params(af, {knob[0]: v}),
        )
        print(
            f"\n{label}: {af_factory}; build {af_seconds:.1f}s; its search params "
            f"{infos.get('index_param', '')}"
        )
        print(f"  build time ours / autofaiss: {ours_seconds / af_seconds:.2f}")
        print_curve("autofaiss", theirs)
        for ms in sorted({round(p[2], 3) for p in theirs}):
            print(
                f"  at <= {ms:.3f} ms/query: recall@10 ours {recall_at_latency(ours, ms):.3f} "
                f"vs autofaiss {recall_at_latency(theirs, ms):.3f}"
            )
    shutil.rmtree(work, ignore_errors=True)


def print_curve(name: str, points: list) -> None:
    print(f"  {name} latency-recall curve ([knob] ms/query, recall@10, QPS):")
    for value, recall, ms, qps in points:
        print(f"    [{value}] {ms:.3f} ms  {recall:.3f}  {qps:,.0f} qps")


if __name__ == "__main__":
    main()

"""Retrieval at scale: ImageNet-1K x 80 prompts over growing corpora, on Ray and in one process.

python jobs/bench_retrieve_scale.py [--sizes 1000000,2000000,4000000] [--k 7,14,28]
    [--single-process-up-to 4000000] [--recall-sample 100000] [--work DIR [--reuse]]

For each corpus size: a clustered embedding set (react_ray.synthetic.embeddings) whose centres
are the class prompts' embeddings by the real (random-weight) ``react-micro`` model plus as many
background centres, 2% of its images re-encoded copies of others; an IVF index; then the task
``classnames_from: imagenet1k, templates: imagenet80`` (80,000 prompts) retrieved with the
size's ``k_per_prompt``:
- on Ray (``react-ray retrieve``'s job, in its own driver process joined to this script's local
  Ray): wall time per stage, the driver's peak RSS and the Ray processes' (summed PSS), sampled
  every 0.5 s; pairs per second;
- in one process (``retrieve()``, the path before the Ray job) where it finishes within the
  time limit: wall time, peak RSS.
Then the near-duplicate step's recall: the close pairs (cosine >= 0.95) the IVF-list bucketing
finds vs an exact range search, on a sample of the largest corpus, with the lists the largest run
used. Prints a table; writes it as JSON to WORK/bench-retrieve-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

MODEL = "react-micro"
ROWS_PER_FILE = 20_000
DRIVER = """
import json, sys, time
from react_ray.config import RetrieveConfig
from react_ray.jobs.retrieve import run_retrieval
config = RetrieveConfig.model_validate_json(sys.argv[1])
start = time.perf_counter()
result = run_retrieval(config)
print("RESULT", json.dumps({"wall_s": time.perf_counter() - start, "pairs": result.pairs,
    "stages_s": result.seconds, "steps": [[s, n] for s, n, _ in result.log.steps]}))
"""
SINGLE = """
import json, sys, time
import numpy as np
from react_ray.index.sharded import ShardedIndex
from react_ray.models import build_model
from react_ray.models.config import ModelConfig
from react_ray.retrieve.retrieval import retrieve
from react_ray.retrieve.task import load_task
start = time.perf_counter()
clip = build_model(ModelConfig(name=sys.argv[3]))
pairs, log = retrieve(load_task(sys.argv[1]), {"image": ShardedIndex(sys.argv[2])},
    lambda texts: clip.encode_texts(texts).detach().numpy())
print("RESULT", json.dumps({"wall_s": time.perf_counter() - start, "pairs": len(pairs),
    "steps": [[s, n] for s, n, _ in log.steps]}))
"""


def ray_memory_mb(driver_pid: int) -> float:
    """Summed PSS of this machine's Ray processes (workers, raylet, GCS), the driver excluded."""
    total = 0
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
            if process.info["pid"] != driver_pid and (
                line.startswith("ray::") or "raylet" in line or "gcs_server" in line
            ):
                total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


def run_child(script: str, args: list[str], limit_s: float) -> tuple[dict | None, float, float]:
    """Run a driver; -> (its RESULT, its peak RSS, the Ray processes' peak while it ran).

    Its peak is sampled here, not read from its ``ru_maxrss``: Linux carries the high-water mark
    of the forked copy of this process across ``exec``, so the child would report this
    process's size (the generated corpus) as its own."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    peak, own, done = [0.0], [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], ray_memory_mb(child.pid))
            try:
                own[0] = max(own[0], psutil.Process(child.pid).memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                pass
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = child.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return None, own[0], peak[0]
    finally:
        done.set()
        sampler.join()
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not results:
        print(out[-3000:])
        raise RuntimeError(f"driver failed with code {child.returncode}")
    return json.loads(results[-1][len("RESULT ") :]), own[0], peak[0]


def corpus_centres(rng: np.random.Generator) -> np.ndarray:
    """The 80,000 prompts' embeddings and as many random directions: each prompt has a
    neighbourhood of its own, as a trained CLIP's templates of one class do (here the templates
    of a class have mean cosine ~0.70 with each other, ~0.63 with another class's)."""
    from react_ray.models import build_model
    from react_ray.models.config import ModelConfig
    from react_ray.retrieve.task import TaskSpec

    clip = build_model(ModelConfig(name=MODEL))
    prompts = TaskSpec(name="in1k", classnames_from="imagenet1k").prompts()
    vectors = np.concatenate(
        [
            clip.encode_texts([p for _, p in prompts[i : i + 2000]]).detach().numpy()
            for i in range(0, len(prompts), 2000)
        ]
    )
    return np.concatenate([vectors, rng.normal(size=vectors.shape) / np.sqrt(vectors.shape[1])])


def near_duplicate_recall(embeddings: str, sample: int, pairs: int) -> dict:
    """Close pairs found by IVF-list bucketing (the job's functions, ``nlist`` as for ``pairs``
    kept pairs) vs exact, on ``sample`` corpus images."""
    import faiss
    import pandas as pd
    import ray

    from react_ray.formats.embedding_set import column_matrix, committed_files, read_parquet
    from react_ray.retrieve.on_ray import close_pairs_in_list, list_rows
    from react_ray.retrieve.retrieval import NEAR_DUP_NPROBE

    tables = []
    for file in committed_files(embeddings)[1]:
        tables.append(read_parquet(file.uri, ["id", "img_emb"]))
        if sum(t.num_rows for t in tables) >= sample:
            break
    vectors = np.concatenate([column_matrix(t, "img_emb") for t in tables])[:sample]
    vectors = vectors.astype(np.float32)
    ids = np.concatenate([t["id"].to_numpy() for t in tables])[:sample]
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    limits, _, found = flat.range_search(vectors, 0.95)
    rows = np.repeat(np.arange(len(vectors)), np.diff(limits).astype(np.int64))
    exact = {(int(a), int(b)) for a, b in zip(ids[rows], ids[found]) if a < b}
    nlist = int(4 * np.sqrt(pairs))
    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=10, seed=0, spherical=True)
    kmeans.train(vectors[: 64 * nlist])
    frame = pd.DataFrame(
        {"id": ids, "label": 0, "score": np.float32(0), "vector": [v.tobytes() for v in vectors]}
    )
    spread = list_rows(frame, ray.put(kmeans.centroids), NEAR_DUP_NPROBE)
    edges = pd.concat(
        [
            close_pairs_in_list(group, 0.95).to_pandas()
            for _, group in spread.groupby("list", sort=False)
        ]
    )
    bucketed = {(min(a, b), max(a, b)) for a, b in zip(edges["a_id"], edges["b_id"])}
    return {
        "sample": len(vectors),
        "nlist": nlist,
        "probes": NEAR_DUP_NPROBE,
        "exact_pairs": len(exact),
        "found": len(bucketed & exact),
        "recall": len(bucketed & exact) / max(1, len(exact)),
    }


def prepare(emb: str, index: str, size: int, centres: np.ndarray) -> None:
    """The corpus's embedding set (2% near-copies) and its IVF index."""
    from react_ray.config import IndexConfig
    from react_ray.jobs.index import build_index
    from react_ray.synthetic.embeddings import write_clustered_embedding_set

    write_clustered_embedding_set(
        emb,
        size // ROWS_PER_FILE,
        ROWS_PER_FILE,
        dim=centres.shape[1],
        model=MODEL,
        centres=centres,
        spread=0.09,  # each image ~0.9 cosine from its centre
        near_copies=0.02,
    )
    nlist = 1 << int(np.log2(4 * np.sqrt(size)))
    build_index(
        IndexConfig(
            embeddings=emb,
            output=index,
            factory=f"IVF{nlist},Flat",
            train_samples=64 * nlist,
            tune_queries=50,
            target_recall=0.9,
        ),
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,2000000,4000000")
    parser.add_argument("--k", default="7,14,28", help="k_per_prompt for each size")
    parser.add_argument("--single-process-up-to", type=int, default=4_000_000)
    parser.add_argument("--single-process-limit-s", type=float, default=1800)
    parser.add_argument("--recall-sample", type=int, default=100_000)
    parser.add_argument("--work", default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="keep corpora and indices already in --work"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    work = args.work or tempfile.mkdtemp(prefix="bench-retrieve-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from react_ray.config import ModelConfig, RetrieveConfig
    from react_ray.ray_utils import start_local

    rng = np.random.default_rng(0)
    centres = corpus_centres(rng)
    start_local(2)
    address = ray.get_runtime_context().gcs_address
    task = os.path.join(work, "imagenet1k.yaml")
    rows, recall = [], None
    for size, k in zip(sizes, ks):
        emb, index = os.path.join(work, f"emb-{size}"), os.path.join(work, f"index-{size}")
        started = time.perf_counter()
        if not (args.reuse and os.path.exists(os.path.join(index, "manifest.json"))):
            prepare(emb, index, size, centres)
        prepared = time.perf_counter() - started
        with open(task, "w") as f:
            f.write(
                f"name: in1k\nclassnames_from: imagenet1k\ntemplates: imagenet80\n"
                f"k_per_prompt: {k}\nnear_duplicate_threshold: 0.95\n"
            )
        config = RetrieveConfig(
            task=task,
            image_index=index,
            model=ModelConfig(name=MODEL),
            output=os.path.join(work, f"retrieved-{size}"),
            gallery_per_class=0,
            workers={"max_actors": 2},
            ray_address=address,
        )
        on_ray, driver_peak, cluster_peak = run_child(DRIVER, [config.model_dump_json()], 3600)
        single, single_peak = None, None
        if size <= args.single_process_up_to:
            single, single_peak, _ = run_child(
                SINGLE, [task, index, MODEL], args.single_process_limit_s
            )
        row = {
            "vectors": size,
            "k_per_prompt": k,
            "prepare_s": round(prepared, 1),
            "hits": on_ray["steps"][0][1],
            "pairs": on_ray["pairs"],
            "ray_wall_s": round(on_ray["wall_s"], 1),
            "ray_stages_s": on_ray["stages_s"],
            "driver_peak_mb": round(driver_peak),
            "ray_processes_peak_mb": round(cluster_peak),
            "pairs_per_s": round(on_ray["pairs"] / on_ray["wall_s"]),
            "single_wall_s": round(single["wall_s"], 1) if single else None,
            "single_peak_mb": round(single_peak) if single else None,
            "single_pairs": single["pairs"] if single else None,
            "single_steps": single["steps"] if single else None,
            "ray_steps": on_ray["steps"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    recall = near_duplicate_recall(
        os.path.join(work, f"emb-{sizes[-1]}"), args.recall_sample, rows[-1]["pairs"]
    )
    ray.shutdown()
    print(
        f"\n{'vectors':>9} {'k':>4} {'hits':>10} {'pairs':>10} {'Ray s':>7} {'pairs/s':>8} "
        f"{'driver MB':>9} {'Ray MB':>7} {'1-proc s':>8} {'1-proc MB':>9}"
    )
    for r in rows:
        print(
            f"{r['vectors']:>9,} {r['k_per_prompt']:>4} {r['hits']:>10,} {r['pairs']:>10,} "
            f"{r['ray_wall_s']:>7} {r['pairs_per_s']:>8,} {r['driver_peak_mb']:>9} "
            f"{r['ray_processes_peak_mb']:>7} {r['single_wall_s'] or '-':>8} "
            f"{r['single_peak_mb'] or '-':>9}"
        )
    first, last = rows[0], rows[-1]
    print(
        f"driver peak memory {last['driver_peak_mb'] / first['driver_peak_mb']:.2f}x for "
        f"{last['pairs'] / first['pairs']:.1f}x the pairs (goal <= 1.3x); wall time "
        f"{last['ray_wall_s'] / first['ray_wall_s']:.2f}x (linear: "
        f"{last['pairs'] / first['pairs']:.1f}x); near-duplicate pair recall "
        f"{recall['recall']:.4f} ({recall['found']:,} of {recall['exact_pairs']:,} on "
        f"{recall['sample']:,} images, {recall['nlist']} lists, {recall['probes']} probes)"
    )
    with open(os.path.join(work, "bench-retrieve-scale.json"), "w") as f:
        json.dump({"runs": rows, "near_duplicate_recall": recall}, f, indent=1)


if __name__ == "__main__":
    main()

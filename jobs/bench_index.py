"""Index benchmark: text-to-image search on CLIP's geometry; ours, exact search and autofaiss.

python jobs/bench_index.py [--vectors 1000000 --dims 128 512 --out runs/bench-index]

For each dim, on one embedding set (react_ray.synthetic.embeddings.ClipGeometry: modality gap,
matched cosine ~0.33) and held-out caption queries (pairs never indexed), side by side in one run:
exact search (faiss Flat), our planned sharded build (2 shards, 2 Ray workers), our HNSW32 (the
graph the planner no longer picks for captions), autofaiss's own choice and autofaiss forced to
our index type, all under one memory budget (by default 1.1x an HNSW32 of the set, so every tool
could pick a graph). Each index is swept over its knob (nprobe / efSearch): recall@10 and
recall@100 against exact search, ms per single query (one at a time) and per query in batches of
256. Writes ``results.json``, ``summary.md`` (what each recall costs), ``frontier.md`` (every
setting) and ``frontier.png`` to ``--out``; ``--report`` rewrites them from ``results.json``.

autofaiss pins numpy<2 and needs pyarrow<17, and its OPQ code calls faiss with keyword arguments
that faiss 1.15 rejects, so it runs in its own virtual environment with faiss 1.7.4:
    python3 -m venv /tmp/afenv && /tmp/afenv/bin/pip install autofaiss "pyarrow<17" \
        "faiss-cpu==1.7.4"
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
from react_ray.index.plan import factory_nlist, format_bytes
from react_ray.index.sharded import ShardedIndex, set_search_params
from react_ray.index.tune import knob_for, recall_at_k
from react_ray.jobs.index import build_index
from react_ray.ray_utils import start_local
from react_ray.synthetic.embeddings import geometry_figures, write_clustered_embedding_set

AUTOFAISS_SCRIPT = """
import json, sys, time
from autofaiss import build_index
start = time.perf_counter()
key = sys.argv[5] or None  # None: autofaiss chooses, as its users get by default
_, infos = build_index(
    embeddings=sys.argv[1], index_path=sys.argv[2], index_infos_path=sys.argv[3],
    max_index_memory_usage=sys.argv[4], current_memory_available="12G", metric_type="ip",
    index_key=key, save_on_disk=True, verbose=30)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
BATCH = 256
KNOB_VALUES = {
    "nprobe": [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096],
    "efSearch": [16, 32, 64, 128, 256, 512, 1024, 2048],
}


def measure(search, queries: np.ndarray, truth: np.ndarray, singles: int) -> dict:
    """recall@10, recall@100 (batches of 256, k=100) and ms/query, single and batched."""
    search(queries[:BATCH])  # warm up
    start, found = time.perf_counter(), []
    for b in range(0, len(queries), BATCH):
        found.append(search(queries[b : b + BATCH]))
    batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
    found = np.concatenate(found)
    start = time.perf_counter()
    for q in queries[:singles]:
        search(q[None])
    single_ms = 1000 * (time.perf_counter() - start) / singles
    return {
        "recall@10": round(recall_at_k(found[:, :10], truth[:, :10]), 4),
        "recall@100": round(recall_at_k(found, truth), 4),
        "single_ms": round(single_ms, 4),
        "batch_ms": round(batch_ms, 4),
    }


def sweep(search, set_knob, factory: str, queries, truth, singles: int) -> list[dict]:
    """The frontier of one index: each knob value, cheap to costly, until recall saturates."""
    knob = knob_for(factory)
    if knob is None:
        return [measure(search, queries, truth, singles)]
    name = knob[0]
    limit = factory_nlist(factory) if name == "nprobe" else 10**9
    points = []
    for value in [v for v in KNOB_VALUES[name] if v <= limit]:
        set_knob(name, value)
        points.append({name: value, **measure(search, queries, truth, singles)})
        if points[-1]["recall@10"] >= 0.999 and points[-1]["recall@100"] >= 0.995:
            break
    return points


def best_recall_within(points: list[dict], ms: float, latency: str, recall: str) -> float:
    return max((p[recall] for p in points if p[latency] <= ms * 1.05), default=0.0)


def write_embeddings(work: str, vectors: int, dim: int, files: int, queries: int):
    """The set (``files`` committed files), held-out caption queries (one more file's pairs, never
    committed, so never indexed) and .npy copies for autofaiss; returns (emb, npy, ids, queries,
    figures)."""
    emb, npy = os.path.join(work, "emb"), os.path.join(work, "npy")
    rows = vectors // files
    write_clustered_embedding_set(emb, files + 1, rows, dim=dim, num_clusters=1000)
    held_out = os.path.join(emb, f"part-{files:06d}")
    os.remove(f"{held_out}.done")
    table = read_parquet(f"{held_out}.parquet", ["img_emb", "txt_emb"])
    figures = geometry_figures(column_matrix(table, "img_emb"), column_matrix(table, "txt_emb"))
    text = np.ascontiguousarray(column_matrix(table, "txt_emb")[:queries], np.float32)
    os.remove(f"{held_out}.parquet")
    _, committed = committed_files(emb)
    os.makedirs(npy)
    all_ids = []
    for i, f in enumerate(committed):  # the same vectors, in the same order
        table = read_parquet(f.uri, ["id", "img_emb"])
        np.save(os.path.join(npy, f"emb_{i:04d}.npy"), column_matrix(table, "img_emb"))
        all_ids.append(table["id"].to_numpy())
    return emb, npy, np.concatenate(all_ids), text, figures


def run_autofaiss(args, npy: str, work: str, budget: str, key: str) -> dict | None:
    index_path, infos_path = os.path.join(work, "af.index"), os.path.join(work, "af.json")
    try:
        run = subprocess.run(
            [
                args.autofaiss_python,
                "-c",
                AUTOFAISS_SCRIPT,
                npy,
                index_path,
                infos_path,
                budget,
                key,
            ],
            capture_output=True,
            text=True,
            timeout=args.autofaiss_timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"  autofaiss {key or '(own choice)'}: no index within {args.autofaiss_timeout}s")
        return None
    if run.returncode != 0:
        print(f"  autofaiss {key or '(own choice)'} failed: {run.stderr.strip()[-500:]}")
        return None
    infos = json.load(open(infos_path))
    return {
        "seconds": json.loads(run.stdout.strip().splitlines()[-1])["seconds"],
        "factory": infos.get("index_key", key),
        "bytes": os.path.getsize(index_path),
        "index": faiss.read_index(index_path),
    }


def bench_dim(args, dim: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"bench-index-{dim}-", dir=args.work)
    t = time.perf_counter()
    emb, npy, all_ids, queries, figures = write_embeddings(
        work, args.vectors, dim, args.files, args.queries
    )
    n = len(all_ids)
    print(
        f"\n== {n:,} x {dim}: written in {time.perf_counter() - t:.0f}s; geometry "
        + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
    )
    budget = args.budget_mb.get(dim) or round(1.1 * n * (dim * 4 + 32 * 2 * 4 + 8) / 2**20)
    print(f"  memory budget {budget} MB; {len(queries)} held-out caption queries")
    exact = faiss.IndexFlatIP(dim)
    for name in sorted(os.listdir(npy)):
        exact.add(np.load(os.path.join(npy, name)))
    truth = all_ids[exact.search(queries, 100)[1]]
    systems = {}

    def record(label, factory, seconds, size, points):
        systems[label] = {"factory": factory, "build_s": seconds, "bytes": size, "points": points}
        print(f"  {label}: {factory}, build {seconds:.1f}s, {format_bytes(size)}")
        for p in points:
            print(f"    {p}")

    record(
        "exact",
        "Flat",
        0.0,
        n * dim * 4,
        sweep(lambda q: all_ids[exact.search(q, 100)[1]], None, "Flat", queries, truth, 20),
    )
    exact.reset()  # its memory back before the builds

    def ours(label: str, factory: str | None, shards: int) -> ShardedIndex:
        start_local(2)
        t = time.perf_counter()
        manifest = build_index(
            IndexConfig(
                embeddings=emb,
                output=os.path.join(work, label),
                memory_budget_gb=budget / 1024,
                factory=factory,
                num_shards=shards,
                files_per_task=10,
                tune_queries=200,
                target_recall=0.95,
            ),
            progress=False,
        )
        seconds = time.perf_counter() - t
        ray.shutdown()
        print(f"  {label}: build stages {manifest.seconds}; tuned {manifest.search_params}")
        index = ShardedIndex(os.path.join(work, label))
        record(
            label,
            manifest.factory,
            seconds,
            sum(s.bytes for s in manifest.shards),
            sweep(
                lambda q: index.search(q, 100)[1],
                lambda name, value: index.set_params({name: value}),
                manifest.factory,
                queries,
                truth,
                args.singles,
            ),
        )
        return index

    index = ours("ours", None, 2)
    factory = systems["ours"]["factory"]
    mapped = ShardedIndex(index.index_uri, memory_map=True)  # the shards side by side, as before
    del index
    systems["ours, shards memory-mapped"] = {
        **systems["ours"],
        "points": sweep(
            lambda q: mapped.search(q, 100)[1],
            lambda name, value: mapped.set_params({name: value}),
            factory,
            queries,
            truth,
            args.singles,
        ),
    }
    if dim in args.hnsw_dims:
        ours("ours, HNSW32", "IDMap,HNSW32", 1)

    for label, key in (("autofaiss, own choice", ""), ("autofaiss, our type", factory)):
        af = run_autofaiss(args, npy, work, f"{budget}MB", key)
        if af is None:
            continue
        index = af["index"]
        record(
            label,
            af["factory"],
            af["seconds"],
            af["bytes"],
            sweep(
                lambda q, index=index: all_ids[np.maximum(index.search(q, 100)[1], 0)],
                lambda name, value, index=index: set_search_params(index, {name: value}),
                af["factory"],
                queries,
                truth,
                args.singles,
            ),
        )
        del af, index
    shutil.rmtree(work, ignore_errors=True)
    return {"vectors": n, "dim": dim, "budget_mb": budget, "geometry": figures, "systems": systems}


def verdicts(result: dict) -> list[str]:
    """The issue's goals, each measured."""
    systems, lines = result["systems"], []
    ours = systems["ours"]["points"]
    exact_ms = systems["exact"]["points"][0]["single_ms"]
    fast = [p for p in ours if p["recall@10"] >= 0.95]
    if fast:
        lines.append(
            f"recall@10 >= 0.95 at {fast[0]['single_ms']:.2f} ms/query single = "
            f"1/{exact_ms / fast[0]['single_ms']:.0f} of exact ({exact_ms:.1f} ms)"
        )
    for label in ("autofaiss, own choice", "autofaiss, our type"):
        if label not in systems:
            continue
        for latency in ("single_ms", "batch_ms"):
            for recall in ("recall@10", "recall@100"):
                theirs = systems[label]["points"]
                wins = [
                    best_recall_within(ours, p[latency], latency, recall) >= p[recall] - 0.002
                    for p in theirs
                ]
                lines.append(
                    f"vs {label} ({systems[label]['factory']}), {recall} at equal {latency}: "
                    f"ours >= at {sum(wins)} of {len(wins)} of its settings"
                )
        lines.append(
            f"build ours / {label}: {systems['ours']['build_s'] / systems[label]['build_s']:.2f} "
            f"({format_bytes(systems['ours']['bytes'])} vs "
            f"{format_bytes(systems[label]['bytes'])})"
        )
    return lines


def cost_of_recall(points: list[dict], latency: str, target: float) -> str:
    """The fastest setting's ms/query with recall@10 >= target, or "-" when none reaches it."""
    ms = [p[latency] for p in points if p["recall@10"] >= target]
    return f"{min(ms):.2f}" if ms else "-"


TARGETS = (0.9, 0.95, 0.99)


def summary_table(results: list[dict]) -> str:
    """Per dim and index: build, size and the ms/query each recall@10 target costs."""
    head = " | ".join(f"{t} single | {t} batch" for t in TARGETS)
    lines = []
    for result in results:
        lines += [
            f"\n{result['vectors']:,} x {result['dim']} (budget {result['budget_mb']} MB); ms per "
            "query to reach recall@10 of:\n",
            f"| index | build s | size | {head} |",
            "|---|---:|---:|" + "---:|" * 2 * len(TARGETS),
        ]
        for label, system in result["systems"].items():
            costs = " | ".join(
                cost_of_recall(system["points"], latency, t)
                for t in TARGETS
                for latency in ("single_ms", "batch_ms")
            )
            lines.append(
                f"| {label}: `{system['factory']}` | {system['build_s']:.0f} | "
                f"{format_bytes(system['bytes'])} | {costs} |"
            )
        lines += [""] + [f"- {line}" for line in verdicts(result)]
    return "\n".join(lines) + "\n"


def frontier_table(results: list[dict]) -> str:
    lines = ["# Every setting measured\n"]
    for result in results:
        lines += [
            f"\n### {result['vectors']:,} x {result['dim']}, budget {result['budget_mb']} MB\n",
            "| index | build s | size | knob | recall@10 | recall@100 | ms single | ms batch |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for label, system in result["systems"].items():
            for p in system["points"]:
                knob = next((f"{k} {v}" for k, v in p.items() if k in KNOB_VALUES), "")
                lines.append(
                    f"| {label}: {system['factory']} | {system['build_s']:.0f} | "
                    f"{format_bytes(system['bytes'])} | {knob} | {p['recall@10']:.3f} | "
                    f"{p['recall@100']:.3f} | {p['single_ms']:.3f} | {p['batch_ms']:.3f} |"
                )
    return "\n".join(lines) + "\n"


COLORS = {  # one colour per index in every panel
    "exact": "black",
    "ours": "tab:orange",
    "ours, shards memory-mapped": "tab:green",
    "ours, HNSW32": "tab:red",
    "autofaiss, own choice": "tab:purple",
    "autofaiss, our type": "tab:brown",
}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False, constrained_layout=True
    )
    for row, result in zip(axes, results):
        for ax, latency in zip(row, ("single_ms", "batch_ms")):
            for label, system in result["systems"].items():
                xs = [p[latency] for p in system["points"]]
                ys = [p["recall@10"] for p in system["points"]]
                style = "*" if label == "exact" else ("-o" if label.startswith("ours") else "--s")
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=COLORS.get(label),
                    label=f"{label}: {system['factory']}",
                    markersize=4,
                )
            ax.set_xscale("log")
            ax.set_xlabel(
                "ms per query, " + ("one at a time" if latency == "single_ms" else "batches of 256")
            )
            ax.set_ylabel("recall@10 (captions -> image keys)")
            ax.set_title(f"{result['vectors']:,} x {result['dim']}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--queries", type=int, default=512, help="held-out caption queries")
    parser.add_argument("--singles", type=int, default=100, help="of them, searched one at a time")
    parser.add_argument(
        "--budget-mb", type=json.loads, default={}, help="per dim, e.g. '{\"128\": 800}'"
    )
    parser.add_argument("--hnsw-dims", type=int, nargs="*", default=[128])
    parser.add_argument("--autofaiss-python", default="/tmp/afenv/bin/python")
    parser.add_argument("--autofaiss-timeout", type=int, default=1800)
    parser.add_argument("--work", default=None, help="scratch folder (default: the system's)")
    parser.add_argument("--out", default="runs/bench-index")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the tables and plot from --out"
    )
    args = parser.parse_args()
    args.budget_mb = {int(k): v for k, v in args.budget_mb.items()}
    os.makedirs(args.out, exist_ok=True)
    saved = os.path.join(args.out, "results.json")
    if args.report:
        report(json.load(open(saved)), args.out)
        return
    results = []
    for dim in args.dims:
        results.append(bench_dim(args, dim))
        with open(saved, "w") as f:
            json.dump(results, f, indent=1)
        report(results, args.out)


def report(results: list[dict], out: str) -> None:
    """summary.md (cost of each recall), frontier.md (every setting), frontier.png."""
    summary = summary_table(results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write(frontier_table(results))
    plot(results, os.path.join(out, "frontier.png"))
    print(summary)


if __name__ == "__main__":
    main()

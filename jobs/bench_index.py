"""Index benchmark: text-to-image search on CLIP's geometry; ours, exact search and autofaiss.

python jobs/bench_index.py [--vectors 1000000 --dims 128 512 --out runs/bench-index]

For each dim, on one embedding set (react_ray.synthetic.embeddings.ClipGeometry: modality gap,
matched cosine ~0.33) and held-out caption queries (pairs never indexed), side by side in one run:
exact search (faiss Flat); our planned sharded build (2 shards, 2 Ray workers: fast-scan codes
re-ranked with raw vectors where they fit) and our build of ``IVF,Flat`` over the same lists;
autofaiss's own choice and autofaiss forced to ``IVF,Flat`` (it refuses our re-ranked type with
inner product: "faiss might not create what you expect"); optionally our HNSW32 (the graph the
planner no longer picks for captions) and our shards memory-mapped side by side. All under one
memory budget (by default 1.1x an HNSW32 of the set, so every tool could pick a graph). Each
index is swept over its knob (nprobe / efSearch; a re-ranked index also over k_factor_rf):
recall@10 against exact search and ms per query of k=10 searches, one at a time and in batches
of 256; recall@100 and ms per query of k=100 searches in batches. Writes ``results.json``,
``summary.md`` (what each recall costs), ``frontier.md`` (every setting) and ``frontier.png`` to
``--out``; ``--report`` rewrites them from ``results.json``.

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
from react_ray.index.plan import factory_nlist, format_bytes, is_refined
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
SINGLES_S = 0.5
KNOB_VALUES = {
    "nprobe": [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096],
    "efSearch": [16, 32, 64, 128, 256, 512, 1024, 2048],
}


def measure(search, queries: np.ndarray, truth: np.ndarray, singles: int) -> dict:
    """What a user asking for 10 hits gets: recall@10 and ms/query of k=10 searches, one at a time
    (``singles`` queries) and in batches of 256; and asking for 100: recall@100 and ms/query of
    k=100 batches. Each timing runs for at least ``SINGLES_S``.
    ``search(queries, k)`` gives ids."""

    def batched(k: int) -> tuple[np.ndarray, float]:
        search(queries[:BATCH], k)  # warm up
        # passes over the queries for at least SINGLES_S: one pass of a cheap setting takes
        # ~15 ms, and its time moved 0.024 -> 0.045 ms a query between runs
        passes, start = 0, time.perf_counter()
        while passes == 0 or time.perf_counter() - start < SINGLES_S:
            found = [search(queries[b : b + BATCH], k) for b in range(0, len(queries), BATCH)]
            passes += 1
        ms = 1000 * (time.perf_counter() - start) / (passes * len(queries))
        return np.concatenate(found), ms

    top10, batch_ms = batched(10)
    top100, batch100_ms = batched(100)
    # at least SINGLES_S of them: a cheap setting's 100 queries take ~5 ms, too short to time
    searched, start = 0, time.perf_counter()
    while searched < singles or time.perf_counter() - start < SINGLES_S:
        search(queries[searched % len(queries)][None], 10)
        searched += 1
    single_ms = 1000 * (time.perf_counter() - start) / searched
    return {
        "recall@10": round(recall_at_k(top10, truth[:, :10]), 4),
        "recall@100": round(recall_at_k(top100, truth), 4),
        "single_ms": round(single_ms, 4),
        "batch_ms": round(batch_ms, 4),
        "batch100_ms": round(batch100_ms, 4),
    }


# (latency, recall) pairs the frontier is judged on: 10 hits one at a time or batched, 100 batched
FRONTIERS = (("single_ms", "recall@10"), ("batch_ms", "recall@10"), ("batch100_ms", "recall@100"))
RECALLS = ("recall@10", "recall@100")


# candidates re-ranked per hit, swept for an index that re-ranks: its frontier has two knobs; the
# few-candidate settings are its cheap end (a few lists probed, a handful of candidates enough)
K_FACTORS = (1, 2, 4, 16, 64, 256)
KNOBS = ("nprobe", "efSearch", "k_factor_rf")


def sweep(search, set_params, factory: str, queries, truth, singles: int) -> list[dict]:
    """The frontier of one index: each knob value, cheap to costly, until recall is (nearly) 1
    or stops growing (gains < 0.002: then the codes or the graph limit it, not the knob, and
    every costlier setting is dominated); for a re-ranked index, at each of ``K_FACTORS``."""
    knob = knob_for(factory)
    if knob is None:
        return [measure(search, queries, truth, singles)]
    name = knob[0]
    limit = factory_nlist(factory) if name == "nprobe" else 10**9
    points = []
    for extra in [{"k_factor_rf": f} for f in K_FACTORS] if is_refined(factory) else [{}]:
        run = []
        for value in [v for v in KNOB_VALUES[name] if v <= limit]:
            set_params({**extra, name: value})
            run.append({**extra, name: value, **measure(search, queries, truth, singles)})
            last = run[-1]
            if (last["recall@10"] >= 0.999 and last["recall@100"] >= 0.995) or (
                len(run) > 1 and all(last[r] - run[-2][r] < 0.002 for r in RECALLS)
            ):
                break
        points += run
    return points


def pareto(points: list[dict], latency: str, recall: str) -> list[dict]:
    """The settings no other beats: each faster one reaches less recall."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[latency], -p[recall])):
        if p[recall] > best:
            front.append(p)
            best = p[recall]
    return front


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

    def record(label, factory, seconds, size, points, params=None):
        systems[label] = {"factory": factory, "build_s": seconds, "bytes": size, "points": points}
        systems[label]["params"] = params or {}
        print(f"  {label}: {factory} {params or ''}, build {seconds:.1f}s, {format_bytes(size)}")
        for p in points:
            print(f"    {p}")

    record(
        "exact",
        "Flat",
        0.0,
        n * dim * 4,
        sweep(lambda q, k: all_ids[exact.search(q, k)[1]], None, "Flat", queries, truth, 20),
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
                lambda q, k: index.search(q, k)[1],
                index.set_params,
                manifest.factory,
                queries,
                truth,
                args.singles,
            ),
            manifest.search_params,
        )
        return index

    index = ours("ours", None, 2)
    factory = systems["ours"]["factory"]
    if args.memory_mapped:
        mapped = ShardedIndex(index.index_uri, memory_map=True)  # the shards side by side
        systems["ours, shards memory-mapped"] = {
            **systems["ours"],
            "points": sweep(
                lambda q, k: mapped.search(q, k)[1],
                mapped.set_params,
                factory,
                queries,
                truth,
                args.singles,
            ),
        }
        del mapped
    del index
    nlist = factory_nlist(factory)
    flat = f"IVF{nlist},Flat" if nlist else None  # the same lists, scanned raw
    if flat and flat != factory:
        ours("ours, IVF,Flat", flat, 2)
    if dim in args.hnsw_dims:
        ours("ours, HNSW32", "IDMap,HNSW32", 1)

    for label, key in (("autofaiss, own choice", ""), ("autofaiss, IVF,Flat", flat)):
        if key is None:
            continue
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
                lambda q, k, index=index: all_ids[np.maximum(index.search(q, k)[1], 0)],
                lambda params, index=index: set_search_params(index, params),
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
    fast = sorted((p for p in ours if p["recall@10"] >= 0.95), key=lambda p: p["single_ms"])
    if fast:
        lines.append(
            f"recall@10 >= 0.95 at {fast[0]['single_ms']:.2f} ms/query single = "
            f"1/{exact_ms / fast[0]['single_ms']:.0f} of exact ({exact_ms:.1f} ms)"
        )
    if "ours, IVF,Flat" in systems:
        flat = systems["ours, IVF,Flat"]["points"]
        for latency, recall in FRONTIERS:
            for target in TARGETS:
                mine, theirs = (cost_of_recall(p, latency, target, recall) for p in (ours, flat))
                if mine != "-" and theirs != "-":
                    lines.append(
                        f"ours / our IVF,Flat, ms at {recall} {target} {latency[:-3]}: "
                        f"{mine} / {theirs} = 1/{float(theirs) / float(mine):.1f}"
                    )
    for label in ("autofaiss, own choice", "autofaiss, IVF,Flat"):
        if label not in systems:
            continue
        for latency, recall in FRONTIERS:
            theirs = systems[label]["points"]
            short = [  # (its recall, how much less ours reaches within its latency)
                (p[recall], p[recall] - best_recall_within(ours, p[latency], latency, recall))
                for p in theirs
            ]
            lost = [(r, gap) for r, gap in short if gap > 0.002]
            lines.append(
                f"vs {label} ({systems[label]['factory']}), {recall} at equal {latency}: "
                f"ours >= at {len(short) - len(lost)} of {len(short)} of its settings"
                + (
                    f"; short by up to {max(g for _, g in lost):.3f} at its "
                    f"{', '.join(f'{r:.2f}' for r, _ in lost)}"
                    if lost
                    else ""
                )
            )
        lines.append(
            f"build ours / {label}: {systems['ours']['build_s'] / systems[label]['build_s']:.2f} "
            f"({format_bytes(systems['ours']['bytes'])} vs "
            f"{format_bytes(systems[label]['bytes'])})"
        )
    return lines


def cost_of_recall(points: list[dict], latency: str, target: float, recall: str) -> str:
    """The fastest setting's ms/query with ``recall`` >= target, or "-" when none reaches it."""
    ms = [p[latency] for p in points if p[recall] >= target]
    return f"{min(ms):.2f}" if ms else "-"


TARGETS = (0.9, 0.95, 0.99)


def summary_table(results: list[dict]) -> str:
    """Per dim and index: build, size and the ms/query each recall target costs."""
    columns = [(latency, recall, t) for latency, recall in FRONTIERS for t in TARGETS]
    names = {"single_ms": "single", "batch_ms": "batch", "batch100_ms": "batch"}
    head = " | ".join(f"{r} {t} {names[latency]}" for latency, r, t in columns)
    lines = []
    for result in results:
        lines += [
            f"\n{result['vectors']:,} x {result['dim']} (budget {result['budget_mb']} MB); ms per "
            "query to reach each recall (k=10 for recall@10, k=100 for recall@100):\n",
            f"| index | build s | size | {head} |",
            "|---|---:|---:|" + "---:|" * len(columns),
        ]
        for label, system in result["systems"].items():
            costs = " | ".join(
                cost_of_recall(system["points"], latency, t, recall)
                for latency, recall, t in columns
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
            "| index | build s | size | knob | recall@10 | ms single | ms batch | recall@100 "
            "| ms batch, k=100 |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for label, system in result["systems"].items():
            for p in system["points"]:
                knob = ", ".join(f"{k} {v}" for k, v in p.items() if k in KNOBS)
                lines.append(
                    f"| {label}: {system['factory']} | {system['build_s']:.0f} | "
                    f"{format_bytes(system['bytes'])} | {knob} | {p['recall@10']:.3f} | "
                    f"{p['single_ms']:.3f} | {p['batch_ms']:.3f} | {p['recall@100']:.3f} | "
                    f"{p['batch100_ms']:.3f} |"
                )
    return "\n".join(lines) + "\n"


COLORS = {  # one colour per index in every panel
    "exact": "black",
    "ours": "tab:orange",
    "ours, shards memory-mapped": "tab:green",
    "ours, HNSW32": "tab:red",
    "ours, IVF,Flat": "tab:blue",
    "autofaiss, own choice": "tab:purple",
    "autofaiss, IVF,Flat": "tab:brown",
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
                front = pareto(system["points"], latency, "recall@10")
                xs, ys = [p[latency] for p in front], [p["recall@10"] for p in front]
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
    parser.add_argument("--hnsw-dims", type=int, nargs="*", default=[])
    parser.add_argument(
        "--memory-mapped", action="store_true", help="also sweep our shards memory-mapped"
    )
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

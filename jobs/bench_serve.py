"""Load benchmark of the Serve apps: N concurrent clients for T seconds, batching on vs off.

python jobs/bench_serve.py [--vectors 1000000 --clients 32 --seconds 20 --cpus 2]

Builds a clustered synthetic embedding set of ``--vectors`` (react-micro's 32 dimensions, so
text queries go through the real text tower), an IVF index over it, serves the retrieval app
on 127.0.0.1 with batching on, then off, and the zero-shot app; each run is bounded in clients
and seconds and prints QPS, p50/p99 latency and the error count. The single-process LAION
reference server does about 20 queries/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import tempfile
import threading
import time

import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, make_body, clients: int, seconds: float) -> dict:
    """``clients`` threads posting for ``seconds``; -> qps, p50/p99 ms, errors."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        session, n = requests.Session(), 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = session.post(url, json=make_body(i, n), timeout=30)
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - started)
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def pick(q):
        return (
            1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]
            if latencies
            else float("nan")
        )

    return {
        "qps": len(latencies) / wall,
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "errors": len(errors),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    from PIL import Image
    from ray import serve

    from react_ray.config import (
        IndexConfig,
        ModelConfig,
        RetrievalAppConfig,
        ServeConfig,
        ZeroShotAppConfig,
    )
    from react_ray.jobs.index import build_index
    from react_ray.ray_utils import start_local
    from react_ray.synthetic.embeddings import write_clustered_embedding_set
    from serve_apps.run import start_apps

    root = tempfile.mkdtemp(prefix="bench-serve-")
    files = max(1, args.vectors // 100_000)
    write_clustered_embedding_set(
        f"{root}/emb",
        num_files=files,
        rows_per_file=args.vectors // files,
        dim=32,
        model="react-micro",
    )
    start_local(args.cpus)
    build_index(
        IndexConfig(
            embeddings=f"{root}/emb",
            output=f"{root}/index",
            num_shards=2,
            memory_budget_gb=2,
            tune_queries=200,
            tasks={"num_cpus": 1},
        )
    )
    words = ["red", "blue", "green", "star", "circle", "square", "heart", "ring", "cross", "moon"]

    def search_body(i, n):
        return {
            "queries": [{"text": f"a photo of a {words[(i + n) % 10]} {words[(i * 3 + n) % 10]}"}],
            "index": "bench",
            "k": 10,
        }

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()

    def classify_body(i, n):
        return {
            "images": [image],
            "classnames": words[:5],
            "templates": ["a photo of a {}."],
        }

    results = {}
    for batching in (True, False):
        port = _free_port()
        config = ServeConfig(
            port=port,
            retrieval=RetrievalAppConfig(
                indices={"bench": {"image": f"{root}/index"}},
                model=ModelConfig(name="react-micro"),
                shard_groups=1,
                batching=batching,
                replica={"num_cpus": 0.25},
            ),
            zeroshot=ZeroShotAppConfig(
                models={"micro": ModelConfig(name="react-micro")},
                default_model="micro",
                replica={"num_cpus": 0.25},
            )
            if batching
            else None,
        )
        urls = start_apps(config)
        load(f"{urls['retrieval']}/v1/search", search_body, 4, 2)  # warm up
        results[f"retrieval, batching {'on' if batching else 'off'}"] = load(
            f"{urls['retrieval']}/v1/search", search_body, args.clients, args.seconds
        )
        if batching:
            results["zero-shot (1 image, 5 classes)"] = load(
                f"{urls['zeroshot']}/v1/classify", classify_body, args.clients, args.seconds
            )
        serve.shutdown()
    print(
        f"\n{args.vectors:,} vectors, {args.clients} "
        f"clients x {args.seconds:.0f} s, {args.cpus} CPUs"
    )
    print(f"{'run':34} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:34} {r['qps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d}")
    on, off = results["retrieval, batching on"], results["retrieval, batching off"]
    print(
        f"batching on / off QPS: {on['qps'] / off['qps']:.2f}; vs the ~20 QPS single-process "
        f"reference: {on['qps'] / 20:.1f}x"
    )


if __name__ == "__main__":
    main()

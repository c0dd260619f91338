"""Download throughput of materialization against a local HTTP server on 127.0.0.1.

python jobs/bench_download.py [--images 4000 --size 256 --threads 16 --cpus 2]

Serves generated JPEGs from a threaded HTTP server in this process, materializes a retrieved
set that points at them (keep_ratio resize to 224), and prints images/s and MB/s, beside a
plain sequential urllib loop over the same URLs for scale. Bounded in count and time; only
127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pyarrow as pa
import ray

from react_ray.config import CorpusConfig, MaterializeConfig
from react_ray.formats import ids
from react_ray.formats.embedding_set import write_parquet
from react_ray.jobs.materialize import run_materialize
from react_ray.ray_utils import start_local
from react_ray.synthetic.corpus import shard_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    corpus = CorpusConfig(
        num_shards=1, samples_per_shard=min(args.images, 10_000), image_size=args.size
    )
    images = [s["jpg"] for s in shard_samples(corpus, 0)]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = images[int(self.path.strip("/").split(".")[0]) % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    urls = [f"{base}/{i}.jpg" for i in range(args.images)]
    work = tempfile.mkdtemp(prefix="bench-download-")
    rows = pd.DataFrame(
        {
            "id": [int(ids.encode(0, i)) for i in range(args.images)],
            "key": urls,
            "url": urls,
            "caption": "x",
            "class": "c",
            "label": 0,
            "score": 1.0,
        }
    )
    write_parquet(
        os.path.join(work, "retrieved.parquet"), pa.Table.from_pandas(rows, preserve_index=False)
    )

    start = time.perf_counter()
    sample = urls[: min(500, len(urls))]
    for url in sample:
        urllib.request.urlopen(url, timeout=10).read()
    sequential = len(sample) / (time.perf_counter() - start)

    start_local(args.cpus)
    summary = run_materialize(
        MaterializeConfig(
            retrieved=work,
            output=os.path.join(work, "out"),
            source="download",
            resize_mode="keep_ratio",
            allowed_networks=["127.0.0.1/32"],
            image_size=224,
            resize_only_if_bigger=False,
            samples_per_shard=max(1, args.images // (2 * args.cpus)),
            threads=args.threads,
            tasks={"num_cpus": 1},
        ),
        progress=False,
    )
    ray.shutdown()
    httpd.shutdown()
    rate = summary.success / summary.seconds
    print(
        f"\ndownload benchmark: {args.images} JPEGs of {args.size}px from 127.0.0.1, {args.cpus} "
        f"CPUs, {args.threads} threads per task, keep_ratio resize to 224"
    )
    print(
        f"  materialize: {summary.success} ok, failed {summary.failed or 'none'}, "
        f"{summary.seconds:.1f}s (incl. Ray start-up): {rate:,.0f} images/s, "
        f"{summary.bytes / summary.seconds / 2**20:.1f} MB/s written"
    )
    print(
        f"  plain sequential urllib loop (fetch only, no decode/resize): {sequential:,.0f} images/s"
    )


if __name__ == "__main__":
    main()

"""Embedding benchmark: the Ray Data pipeline against a bare loop and the model-only ceiling.

python jobs/bench_embed.py [--shards 2 --rows 500 --scale 10 --model react-tiny --cpus 2]

Prints, measured side by side in one run on the same cores, model and data:
- pipeline images/s / bare single-process loop (read + decode + forward) images/s (goal >= 0.9)
- model-forward-only images/s on pre-decoded tensors (the ceiling) / pipeline
- peak memory (PSS of the driver + every Ray process) as the corpus grows ``scale`` x (goal <= 1.3x)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import ray

from react_ray.config import CorpusConfig, EmbedConfig, GenerateConfig, ModelConfig
from react_ray.data.synthetic import generate_corpus
from react_ray.embed.decode import decode_image
from react_ray.embed.embedder import ClipEmbedder
from react_ray.embed.pipeline import run_embedding
from react_ray.embed.readers import list_input_shards, read_shard


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil  # vendored by Ray: importable once ray is

        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bare_loop(input_dir: str, model: str, batch_size: int, threads: int) -> tuple[int, float, list]:
    """What one would write without Ray: read, decode, embed, in one process. Returns (n, seconds, batches)."""
    start, n, kept = time.perf_counter(), 0, []
    embedder = ClipEmbedder({"name": model}, "fp32", "cpu", output="", run_id="", threads=threads)
    size = embedder.clip.image_size
    for shard in list_input_shards(input_dir, "webdataset"):
        pixels, captions = [], []
        for block in read_shard(shard, block_rows=batch_size):
            for record in block:
                if record["kind"] != "record":
                    continue
                array, reason, _ = decode_image(record["image"], size, 40_000_000)
                if array is not None and not record["error"]:
                    pixels.append(array)
                    captions.append(record["caption"])
                if len(pixels) == batch_size:
                    embedder.embed(np.stack(pixels), captions)
                    kept.append((np.stack(pixels), captions))
                    n, pixels, captions = n + len(captions), [], []
        if pixels:
            embedder.embed(np.stack(pixels), captions)
            n += len(captions)
    return n, time.perf_counter() - start, (embedder, kept[:8])


def model_ceiling(embedder: ClipEmbedder, batches: list, repeats: int = 3) -> float:
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for pixels, captions in batches:
            embedder.embed(pixels, captions)
            n += len(captions)
    return n / (time.perf_counter() - start)


def pipeline(input_dir: str, output: str, args):
    # The CPUs split between the model actors and the read/decode tasks (all fit, nothing waits).
    decode_cpus = 0.25 * args.cpus
    config = EmbedConfig(
        input=input_dir, output=output, model=ModelConfig(name=args.model), batch_size=args.batch_size,
        read_block_rows=args.batch_size, decode_num_cpus=decode_cpus,
        pool={"min_actors": args.actors, "max_actors": args.actors, "num_cpus": (args.cpus - decode_cpus) / args.actors},
    )
    with PeakMemory() as memory:
        summary = run_embedding(config, progress=False)
    return summary, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--model", default="react-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=1, help="model actors sharing the CPUs")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-embed-")
    small, large = os.path.join(work, "small"), os.path.join(work, "large")
    generate_corpus(GenerateConfig(output=os.path.join(work, "corpus"), corpus=CorpusConfig(
        num_shards=args.shards, samples_per_shard=args.rows, eval_samples_per_class=1, formats=["webdataset"])),
        progress=False)
    shards = sorted(os.listdir(os.path.join(work, "corpus", "webdataset")))
    for folder, copies in ((small, 1), (large, args.scale)):
        os.makedirs(folder)
        for copy in range(copies):  # the same bytes under new shard numbers: 10x the corpus
            for i, name in enumerate(shards):
                shutil.copy(os.path.join(work, "corpus", "webdataset", name),
                            os.path.join(folder, f"{copy * len(shards) + i:05d}.tar"))

    n_bare, bare_seconds, (embedder, batches) = bare_loop(large, args.model, args.batch_size, args.cpus)
    ceiling = model_ceiling(embedder, batches)
    del embedder

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    small, small_peak = pipeline(small, os.path.join(work, "emb-small"), args)
    large, large_peak = pipeline(large, os.path.join(work, "emb-large"), args)
    wall_rate, steady_rate = large.this_run_rows / large.this_run_seconds, large.this_run_steady_rows_per_s
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nembedding benchmark: {args.model}, batch {args.batch_size}, {args.cpus} CPUs, {args.actors} actors, fp32")
    print(f"  bare loop (model load + read + decode + forward, 1 process): {n_bare} pairs, "
          f"{n_bare / bare_seconds:.1f} pairs/s")
    print(f"  model forward only (pre-decoded tensors, the ceiling): {ceiling:.1f} pairs/s")
    print(f"  Ray Data pipeline, {large.this_run_rows} pairs: {wall_rate:.1f} pairs/s wall "
          f"({large.this_run_startup_seconds:.1f}s to the first batch: Ray workers + model load), "
          f"{steady_rate:.1f} pairs/s after it")
    print(f"  ratio pipeline / bare loop: {wall_rate * bare_seconds / n_bare:.2f} wall, "
          f"{steady_rate * bare_seconds / n_bare:.2f} steady state  (goal >= 0.9)")
    print(f"  ratio ceiling / pipeline (steady): {ceiling / steady_rate:.2f}")
    print(f"  peak memory {small.this_run_rows} pairs: {small_peak / 2**20:.0f} MiB; {large.this_run_rows} pairs: "
          f"{large_peak / 2**20:.0f} MiB; "
          f"growth for {args.scale}x the corpus: {large_peak / small_peak:.2f}x  (goal <= 1.3)")


if __name__ == "__main__":
    main()

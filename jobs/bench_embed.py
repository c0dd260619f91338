"""Embedding benchmark: the Ray Data pipeline against a bare loop and the model-only ceiling.

python jobs/bench_embed.py [--shards 2 --rows 500 --scale 10 --model react-tiny --cpus 2 --repeats 2]

Prints, measured side by side in one run on the same cores, model and data (the bare loop and the
pipeline in turns, ``--repeats`` times, each pair's ratio and their median):
- pipeline images/s / bare single-process loop (read + decode + tokenize + forward) (goal >= 0.9)
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
from dataclasses import dataclass

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


@dataclass
class Rate:
    """Pairs per second of one run: ``wall`` from start (model load included), ``steady`` after the first batch."""

    pairs: int
    wall: float
    steady: float


def bare_loop(input_dir: str, model: str, batch_size: int, threads: int) -> tuple[Rate, ClipEmbedder, list]:
    """What one would write without Ray: read, decode, tokenize, embed, in one process."""
    start, n, kept, first = time.perf_counter(), 0, [], None
    embedder = ClipEmbedder({"name": model}, "fp32", "cpu", output="", run_id="", threads=threads)
    size = embedder.clip.image_size

    def embed(pixels: list, captions: list) -> None:
        nonlocal n, first
        batch = (np.stack(pixels), embedder.clip.tokenizer(captions).numpy())
        embedder.embed(*batch)
        kept.append(batch)
        n += len(captions)
        first = first or (time.perf_counter(), n)

    for shard in list_input_shards(input_dir, "webdataset"):
        pixels, captions = [], []
        for block in read_shard(shard, block_rows=batch_size):
            for record in block:
                if record["kind"] != "record":
                    continue
                array, _, _ = decode_image(record["image"], size, 40_000_000)
                if array is not None and not record["error"]:
                    pixels.append(array)
                    captions.append(record["caption"])
                if len(pixels) == batch_size:
                    embed(pixels, captions)
                    pixels, captions = [], []
        if pixels:
            embed(pixels, captions)
    end = time.perf_counter()
    return Rate(n, n / (end - start), (n - first[1]) / (end - first[0])), embedder, kept[:8]


def model_ceiling(embedder: ClipEmbedder, batches: list, repeats: int = 3) -> float:
    """Model forward only, on batches already decoded and tokenized."""
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for pixels, tokens in batches:
            embedder.embed(pixels, tokens)
            n += len(tokens)
    return n / (time.perf_counter() - start)


def pipeline_config(input_dir: str, output: str, args) -> EmbedConfig:
    # The CPUs split between the model actors and the read/decode tasks (all fit, nothing waits).
    decode_cpus = 0.25 * args.cpus
    return EmbedConfig(
        input=input_dir, output=output, model=ModelConfig(name=args.model), batch_size=args.batch_size,
        read_block_rows=args.batch_size, decode_num_cpus=decode_cpus,
        pool={"min_actors": args.actors, "max_actors": args.actors, "num_cpus": (args.cpus - decode_cpus) / args.actors},
    )


def start_ray(cpus: int) -> None:
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--model", default="react-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=1, help="model actors sharing the CPUs")
    parser.add_argument("--repeats", type=int, default=2, help="bare loop / pipeline pairs, run alternately")
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

    # This machine's speed drifts by a fifth from minute to minute, so the two run in turns and
    # each pair gives its own ratio. Ray is down while the bare loop runs.
    pairs, ceilings = [], []
    for repeat in range(args.repeats):
        bare, embedder, batches = bare_loop(large, args.model, args.batch_size, args.cpus)
        ceilings.append(model_ceiling(embedder, batches))
        del embedder
        start_ray(args.cpus)
        summary = run_embedding(pipeline_config(large, os.path.join(work, f"emb-large-{repeat}"), args), progress=False)
        ray.shutdown()
        ours = Rate(summary.this_run_rows, summary.this_run_rows / summary.this_run_seconds,
                    summary.this_run_steady_rows_per_s)
        pairs.append((bare, ours, summary.this_run_startup_seconds))
    # Memory in runs of its own: reading every process's PSS takes CPU from the pipeline.
    peaks = {}
    start_ray(args.cpus)
    for name, folder in (("small", small), ("large", large)):
        with PeakMemory() as memory:
            run_embedding(pipeline_config(folder, os.path.join(work, f"emb-memory-{name}"), args), progress=False)
        peaks[name] = memory.peak
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nembedding benchmark: {args.model}, batch {args.batch_size}, {args.cpus} CPUs, {args.actors} actors, "
          f"fp32, {pairs[0][0].pairs} pairs per run")
    print(f"{'run':>4} {'bare wall/s':>11} {'bare steady/s':>13} {'pipeline wall/s':>15} {'pipeline steady/s':>17} "
          f"{'start-up s':>10} {'ratio wall':>10} {'ratio steady':>12} {'ceiling/s':>9}")
    for i, ((bare, ours, startup), ceiling) in enumerate(zip(pairs, ceilings)):
        print(f"{i + 1:>4} {bare.wall:11.1f} {bare.steady:13.1f} {ours.wall:15.1f} {ours.steady:17.1f} {startup:10.1f} "
              f"{ours.wall / bare.wall:10.2f} {ours.steady / bare.steady:12.2f} {ceiling:9.1f}")
    wall = float(np.median([ours.wall / bare.wall for bare, ours, _ in pairs]))
    steady = float(np.median([ours.steady / bare.steady for bare, ours, _ in pairs]))
    top = float(np.median([c / ours.steady for c, (_, ours, _) in zip(ceilings, pairs)]))
    print(f"  median ratio pipeline / bare loop: {wall:.2f} wall (start-up included), {steady:.2f} steady state "
          f"(goal >= 0.9)")
    print(f"  median ratio model-forward ceiling (pre-decoded, pre-tokenized) / pipeline steady: {top:.2f}")
    print(f"  peak memory (PSS, driver + Ray): {peaks['small'] / 2**20:.0f} MiB for {args.shards * args.rows} pairs, "
          f"{peaks['large'] / 2**20:.0f} MiB for {args.scale}x that: growth {peaks['large'] / peaks['small']:.2f}x "
          f"(goal <= 1.3)")


if __name__ == "__main__":
    main()

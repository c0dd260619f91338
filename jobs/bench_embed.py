"""Embedding benchmark: the Ray Data pipeline against a bare loop and the model-only ceiling.

python jobs/bench_embed.py [--shards 2 --rows 500 --scale 10 --model react-tiny --cpus 2 --repeats 2
--no-memory]

Prints, measured side by side in one run on the same cores, model and data (the bare loop and the
pipeline in turns, ``--repeats`` times, each pair's ratio and their median):
- pipeline images/s / bare single-process loop (read + decode + tokenize + forward) (goal >= 0.9),
  decoding in CPU tasks (the default, for GPU actors) and in the model actors (``decode_in_actor``)
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
from react_ray.embed.embedder import ClipEmbedder
from react_ray.formats.decode import decode_image
from react_ray.formats.readers import list_input_shards, read_shard
from react_ray.jobs.embed import run_embedding
from react_ray.ray_utils import start_local
from react_ray.synthetic.corpus import generate_corpus


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
    """Pairs per second of one run: ``wall`` from start (model load included), ``steady`` after the
    first batch."""

    pairs: int
    wall: float
    steady: float


def bare_loop(
    input_dir: str, model: str, batch_size: int, threads: int
) -> tuple[Rate, ClipEmbedder, list]:
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


def pipeline_config(
    input_dir: str, output: str, args, decode_in_actor: bool = False
) -> EmbedConfig:
    # The CPUs split between the model actors and the read (+ decode) tasks: all fit, nothing waits.
    task_cpus = 0.125 * args.cpus if decode_in_actor else 0.25 * args.cpus
    return EmbedConfig(
        input=input_dir,
        output=output,
        model=ModelConfig(name=args.model),
        batch_size=args.batch_size,
        read_block_rows=args.batch_size,
        decode={"num_cpus": task_cpus},
        decode_in_actor=decode_in_actor,
        pool={
            "min_actors": args.actors,
            "max_actors": args.actors,
            "num_cpus": (args.cpus - task_cpus) / args.actors,
        },
    )


def start_ray(cpus: int) -> None:
    start_local(cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--model", default="react-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument(
        "--actors",
        type=int,
        help="model actors sharing the CPUs (default: one per CPU, each with one thread)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="turns of bare loop and pipelines, run alternately"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    args = parser.parse_args()
    args.actors = args.actors or args.cpus
    work = tempfile.mkdtemp(prefix="bench-embed-")
    small, large = os.path.join(work, "small"), os.path.join(work, "large")
    generate_corpus(
        GenerateConfig(
            output=os.path.join(work, "corpus"),
            corpus=CorpusConfig(
                num_shards=args.shards,
                samples_per_shard=args.rows,
                eval_samples_per_class=1,
                formats=["webdataset"],
            ),
        ),
        progress=False,
    )
    shards = sorted(os.listdir(os.path.join(work, "corpus", "webdataset")))
    for folder, copies in ((small, 1), (large, args.scale)):
        os.makedirs(folder)
        for copy in range(copies):  # the same bytes under new shard numbers: 10x the corpus
            for i, name in enumerate(shards):
                shutil.copy(
                    os.path.join(work, "corpus", "webdataset", name),
                    os.path.join(folder, f"{copy * len(shards) + i:05d}.tar"),
                )

    # This machine's speed drifts by a fifth from minute to minute, so the two run in turns and
    # each pair gives its own ratio. Ray is down while the bare loop runs.
    turns, ceilings = [], []
    for turn in range(args.repeats):
        bare, embedder, batches = bare_loop(large, args.model, args.batch_size, args.cpus)
        ceilings.append(model_ceiling(embedder, batches))
        del embedder
        start_ray(args.cpus)
        runs = []
        for in_actor in (False, True):
            output = os.path.join(work, f"emb-large-{turn}-{int(in_actor)}")
            summary = run_embedding(pipeline_config(large, output, args, in_actor), progress=False)
            runs.append(
                (
                    Rate(
                        summary.this_run_rows,
                        summary.this_run_rows / summary.this_run_seconds,
                        summary.this_run_steady_rows_per_s,
                    ),
                    summary.this_run_startup_seconds,
                )
            )
        ray.shutdown()
        turns.append((bare, *runs))
    # Memory in runs of its own: reading every process's PSS takes CPU from the pipeline.
    peaks = {}
    if not args.no_memory:
        start_ray(args.cpus)
        for name, folder in (("small", small), ("large", large)):
            with PeakMemory() as memory:
                run_embedding(
                    pipeline_config(folder, os.path.join(work, f"emb-memory-{name}"), args),
                    progress=False,
                )
            peaks[name] = memory.peak
        ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nembedding benchmark: {args.model}, batch {args.batch_size}, {args.cpus} CPUs, "
        f"{args.actors} actors, fp32, {turns[0][0].pairs} pairs per run; pairs/s wall (start-up "
        "included) / steady (after the first batch)"
    )
    print(
        f"{'turn':>4} {'bare loop':>13} {'pipeline':>13} {'start-up s':>10} {'ratio':>11} "
        f"{'decode_in_actor':>15} {'start-up s':>10} {'ratio':>11} {'ceiling':>7}"
    )
    for i, ((bare, (tasks, tasks_startup), (actor, actor_startup)), ceiling) in enumerate(
        zip(turns, ceilings)
    ):
        print(
            f"{i + 1:>4} {bare.wall:6.1f}/{bare.steady:6.1f} {tasks.wall:6.1f}/{tasks.steady:6.1f} "
            f"{tasks_startup:10.1f} "
            f"{tasks.wall / bare.wall:5.2f}/{tasks.steady / bare.steady:5.2f} "
            f"{actor.wall:7.1f}/{actor.steady:7.1f} {actor_startup:10.1f} "
            f"{actor.wall / bare.wall:5.2f}/{actor.steady / bare.steady:5.2f} {ceiling:7.1f}"
        )
    for column, where in ((1, "in CPU tasks"), (2, "in the model actor (decode_in_actor)")):
        wall = float(np.median([t[column][0].wall / t[0].wall for t in turns]))
        steady = float(np.median([t[column][0].steady / t[0].steady for t in turns]))
        top = float(np.median([c / t[column][0].steady for c, t in zip(ceilings, turns)]))
        print(
            f"  decoding {where}: median ratio pipeline / bare loop {wall:.2f} wall, {steady:.2f} "
            f"steady (goal >= 0.9); model-forward ceiling / pipeline steady {top:.2f}"
        )
    if peaks:
        print(
            f"  peak memory (PSS, driver + Ray): {peaks['small'] / 2**20:.0f} MiB for "
            f"{args.shards * args.rows} pairs, {peaks['large'] / 2**20:.0f} MiB for {args.scale}x "
            f"that: growth {peaks['large'] / peaks['small']:.2f}x (goal <= 1.3)"
        )


if __name__ == "__main__":
    main()

"""Growing an index: append the second half of a corpus to an index of the first half, against
rebuilding the whole index (same factory, same trained quantizer, so the same neighbours).

    python jobs/bench_append.py [--files 8 --rows 50000 --dim 128 --factory IVF1024,Flat]

Prints the append time, the one-shot rebuild time (adding and merging only: the quantizer is
reused, as an append reuses it) and their ratio, and checks both answer queries alike.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from react_ray.config import IndexConfig
from react_ray.formats.embedding_set import load_embeddings
from react_ray.index.sharded import ShardedIndex
from react_ray.jobs.index import append_to_index, build_index
from react_ray.ray_utils import start_local
from react_ray.synthetic.embeddings import write_clustered_embedding_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--factory", default="IVF1024,Flat")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-append-"))
    emb = root / "emb"
    write_clustered_embedding_set(str(emb), args.files, args.rows, dim=args.dim)
    later = [f"part-{n:06d}.done" for n in range(args.files // 2, args.files)]
    markers = {name: (emb / name).read_bytes() for name in later}
    for name in later:  # the second half "arrives later"
        (emb / name).unlink()
    start_local(args.cpus)

    def config(output: str) -> IndexConfig:
        return IndexConfig(
            embeddings=str(emb),
            output=str(root / output),
            factory=args.factory,
            num_shards=2,
            train_samples=50_000,
            tune_queries=100,
        )

    build_index(config("grown"), progress=False)
    for name, data in markers.items():
        (emb / name).write_bytes(data)
    start = time.perf_counter()
    append_to_index(config("grown"), progress=False)
    appended = time.perf_counter() - start

    (root / "rebuilt").mkdir()
    shutil.copy(root / "grown" / "_trained.index", root / "rebuilt" / "_trained.index")
    start = time.perf_counter()
    manifest = build_index(config("rebuilt"), progress=False)
    rebuilt = time.perf_counter() - start
    ray.shutdown()

    queries = load_embeddings(str(emb), "txt_emb")[1][::997].astype(np.float32)
    indices = [ShardedIndex(str(root / name)) for name in ("grown", "rebuilt")]
    for index in indices:
        index.set_params({"nprobe": 16})
    same = np.array_equal(indices[0].search(queries, 10)[1], indices[1].search(queries, 10)[1])
    shutil.rmtree(root, ignore_errors=True)
    half = args.files // 2 * args.rows
    print(
        f"\n{args.files * args.rows:,} x {args.dim} vectors, "
        f"{args.factory}; the second {half:,} arrive later"
    )
    print(
        f"  append the new half          {appended:7.1f} s "
        " (drift check, add, merge, new manifest version)"
    )
    print(
        f"  rebuild all, same quantizer  {rebuilt:7.1f} s  (add, merge, tune: {manifest.seconds})"
    )
    print(
        f"  append / rebuild             {appended / rebuilt:7.2f} "
        f"  same neighbours at nprobe 16: {same}"
    )


if __name__ == "__main__":
    main()

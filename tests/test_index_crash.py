"""``index --append`` killed with SIGKILL at random points, as a real process: readers always see
the previous version or the next one, and a rerun finishes with every id exactly once.

Each run is a child process with its own private Ray (started before the clock for the kill runs,
so the kill lands in the append's own work); the kill ends the child's whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from react_ray.formats import ids
from react_ray.formats.index_manifest import IndexManifest
from react_ray.index.sharded import ShardedIndex
from react_ray.synthetic.embeddings import write_clustered_embedding_set

pytestmark = [pytest.mark.slow, pytest.mark.ray]

FILES, ROWS = 6, 800
CHILD = """
import sys, time
from react_ray.config import IndexConfig
from react_ray.jobs.index import append_to_index, build_index
from react_ray.ray_utils import start_local
start_local(2)
config = IndexConfig(embeddings=sys.argv[1], output=sys.argv[2], factory="IVF16,Flat", num_shards=2,
                     train_samples=5000, tune_queries=100)
print("ready", flush=True)
start = time.perf_counter()
(append_to_index if sys.argv[3] == "append" else build_index)(config, progress=False)
print(f"done {time.perf_counter() - start:.2f}", flush=True)
"""


def start_child(embeddings, output, mode: str) -> subprocess.Popen:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(embeddings), str(output), mode],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for line in child.stdout:
        if line.startswith("ready"):
            return child
    raise AssertionError(f"the child ended before it was ready: exit {child.wait()}")


def run_child(embeddings, output, mode: str) -> float:
    child = start_child(embeddings, output, mode)
    rest = child.stdout.read()
    assert child.wait() == 0, rest[-4000:]
    return float(rest.split("done ")[-1])


def kill_group(child: subprocess.Popen) -> None:
    os.killpg(child.pid, signal.SIGKILL)  # the driver and the Ray it started, nothing else
    child.wait()


def indexed_ids(output: str) -> np.ndarray:
    """Every id the published index holds, by an exhaustive search (all lists probed, k = all)."""
    index = ShardedIndex(output)
    index.set_params({"nprobe": 16})
    _, found = index.search(np.ones((1, 64), np.float32) / 8, index.ntotal)
    return found[0][found[0] >= 0]


def test_append_killed_at_random_points_leaves_old_or_new_and_a_rerun_completes(tmp_path):
    emb, out = tmp_path / "emb", tmp_path / "index"
    write_clustered_embedding_set(str(emb), num_files=FILES, rows_per_file=ROWS, dim=64)
    late = {n: (emb / f"part-{n:06d}.done").read_bytes() for n in (3, 4, 5)}
    for n in late:  # these shards "arrive later"
        (emb / f"part-{n:06d}.done").unlink()
    build_seconds = run_child(emb, out, "build")
    first = sorted(indexed_ids(str(out)))
    assert len(first) == 3 * ROWS and IndexManifest.read(str(out)).version == 1
    for n, marker in late.items():
        (emb / f"part-{n:06d}.done").write_bytes(marker)
    everything = np.sort(np.concatenate([ids.encode(n, np.arange(ROWS)) for n in range(FILES)]))

    rng = np.random.default_rng(int(time.time()))
    delays = sorted(rng.uniform(0, build_seconds, size=3))
    seen = []
    for delay in delays:
        child = start_child(emb, out, "append")
        time.sleep(delay)
        finished = child.poll() is not None
        kill_group(child)
        manifest = IndexManifest.read(str(out))
        held = np.sort(indexed_ids(str(out)))  # what a reader (a Serve replica) would load now
        assert manifest.version in (1, 2)
        assert (
            np.array_equal(held, first)
            if manifest.version == 1
            else np.array_equal(held, everything)
        )
        seen.append(f"{delay:.1f}s->v{manifest.version}{' (had finished)' if finished else ''}")
    run_child(emb, out, "append")  # the rerun after the last kill
    final = np.sort(indexed_ids(str(out)))
    print(
        f"\nbuild {build_seconds:.1f}s; kills after ready: {', '.join(seen)}; final version "
        f"{IndexManifest.read(str(out)).version}, {len(final)} ids"
    )
    # each id exactly once
    assert IndexManifest.read(str(out)).version == 2 and np.array_equal(final, everything)

"""Exactly-once under a killed run: kill the embedding job mid-run, rerun, and get every id once.

The job runs as a subprocess with its own local Ray (this module starts no other cluster).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from react_ray.config import CorpusConfig, GenerateConfig
from react_ray.formats import ids
from react_ray.formats.embedding_set import load_embeddings
from react_ray.synthetic.corpus import generate_corpus

ROOT = Path(__file__).resolve().parents[1]
SHARDS, ROWS = 6, 48


def _job(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "embed.py"),
        f"input={corpus}/webdataset",
        f"output={out}",
        "model.name=react-micro",
        "batch_size=8",
        "read_block_rows=8",
        "ray_address=local",
        "pool.max_actors=1",
    ]


ENV = os.environ | {"RAY_AUTH_MODE": "disabled"}


def _start_job(tmp_path) -> tuple[Path, Path, subprocess.Popen]:
    """A generated corpus, and an embedding job over it running in its own process group."""
    corpus, out = tmp_path / "corpus", tmp_path / "emb"
    generate_corpus(
        GenerateConfig(
            output=str(corpus),
            corpus=CorpusConfig(
                num_shards=SHARDS,
                samples_per_shard=ROWS,
                image_size=40,
                eval_samples_per_class=1,
                formats=["webdataset"],
            ),
        ),
        progress=False,
    )
    job = subprocess.Popen(
        _job(corpus, out),
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return corpus, out, job


@pytest.mark.ray
def test_killed_run_then_rerun_gives_every_id_exactly_once(tmp_path):
    corpus, out, job = _start_job(tmp_path)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.done")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert list(out.glob("*.done")), "no shard was committed before the deadline"
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait(timeout=60)

    rerun = subprocess.run(
        _job(corpus, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # A commit already in flight may still land while the killed cluster winds down: count at rerun
    # time.
    done_at_kill = int(re.search(r"(\d+) already done", rerun.stdout).group(1))
    assert 1 <= done_at_kill < SHARDS, (
        f"the kill must land mid-run ({done_at_kill} of {SHARDS} shards done)"
    )
    assert f"{done_at_kill} already done, {SHARDS - done_at_kill} to do" in rerun.stdout
    assert (
        "embed: taking over the lease of the embed run" in rerun.stdout
        and "that process is gone" in rerun.stdout
    )
    found, _ = load_embeddings(str(out))
    expected = {int(ids.encode(s, r)) for s in range(SHARDS) for r in range(ROWS)}
    # none lost, none doubled
    assert len(found) == len(expected) and set(found.tolist()) == expected
    assert not (out / "_parts").exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert (
        summary["rows_embedded"] == SHARDS * ROWS
        and summary["this_run_shards"] == SHARDS - done_at_kill
    )
    assert np.unique(found).size == found.size


@pytest.mark.ray
def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """Two real processes embed into one output: the second is refused at once, naming the first
    (a second run would delete the first's _parts and commit shards twice); the first finishes
    untouched, and releases the output."""
    corpus, out, first = _start_job(tmp_path)
    deadline = time.monotonic() + 120
    while (
        not (out / "_lease.json").exists() and first.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert (out / "_lease.json").exists(), "the first run never took the output"
    second = subprocess.run(
        _job(corpus, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 3, second.stderr[-2000:]
    assert (
        f"{out} is being written by the embed run" in second.stderr
        and f"pid {first.pid}, started" in second.stderr
    )
    assert first.wait(timeout=600) == 0
    assert not (out / "_lease.json").exists()  # released
    found, _ = load_embeddings(str(out))
    assert sorted(found.tolist()) == sorted(
        int(ids.encode(s, r)) for s in range(SHARDS) for r in range(ROWS)
    )

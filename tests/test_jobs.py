"""Stages as Ray jobs: a real head (`ray start --head` on 127.0.0.1, in its own temp dir and ports),
a small pipeline submitted with `ray job submit --working-dir .` exactly as the README says, then
only that head's processes are stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ports import free_port

from react_ray.formats import ids
from react_ray.formats.embedding_set import load_embeddings
from react_ray.index.sharded import ShardedIndex
from react_ray.ray_utils import RAYLET_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _processes_of(temp_dir: str) -> list:
    """Ray processes whose command line names this head's temp dir (and nothing else)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def ray_head():
    """A head of our own; yields (dashboard address, environment for the CLI)."""
    # short: Ray's socket paths must fit 107 bytes
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    dashboard, agent = free_port(), free_port()
    # The head runs as in our image (cluster/Dockerfile sets RAYLET_ENV).
    env = (
        RAYLET_ENV
        | os.environ
        | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    )
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import requests
        from ray.job_submission import JobSubmissionClient

        # The job server answers once the dashboard is up, but hands each submission to the head's
        # agent, which it waits for only 10 s ("No available agent to submit job"): on a loaded
        # machine the agent can start later than that. It registers as its HTTP server starts.
        deadline = time.time() + 120

        def wait_for(ready) -> None:
            while True:
                try:
                    return ready()
                except Exception:
                    if head.poll() is not None or time.time() > deadline:
                        raise RuntimeError(
                            "ray start --head failed: "
                            f"{head.stderr.read() if head.poll() else 'timeout'}"
                        ) from None
                    time.sleep(0.5)

        wait_for(lambda: JobSubmissionClient(address).list_jobs())
        agent_health = f"http://127.0.0.1:{agent}/api/healthz"
        wait_for(lambda: requests.get(agent_health, timeout=5).raise_for_status())
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: this head's processes only
        for process in _processes_of(temp_dir):  # stragglers of this head only
            process.kill()


@pytest.mark.ray
def test_a_small_pipeline_submitted_as_a_ray_job_succeeds(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    out = tmp_path / "run"
    stages = [
        f"python jobs/generate.py --config jobs/presets/generate_demo.yaml output={out}/corpus "
        "corpus.num_shards=2 "
        "corpus.samples_per_shard=40 corpus.eval_samples_per_class=1 corpus.formats=[webdataset]",
        f"python jobs/embed.py --config jobs/presets/embed_demo.yaml input={out}/corpus/webdataset "
        f"output={out}/embeddings model.checkpoint=null model.name=react-micro batch_size=32 "
        "pool.num_cpus=0.5 decode.num_cpus=0.5",
        f"python jobs/index.py --config jobs/presets/index_demo.yaml embeddings={out}/embeddings "
        f"output={out}/index factory=IDMap,Flat num_shards=2 tune_queries=10 tasks.num_cpus=0.5",
    ]
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--submission-id",
        "react-ray-test",
        "--",
        "bash",
        "-c",
        " && ".join(stages),
    ]
    result = subprocess.run(
        submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    client = JobSubmissionClient(address)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-2000:])
    status = client.get_job_status("react-ray-test")
    assert status == JobStatus.SUCCEEDED, (status, result.stdout[-3000:])
    logs = client.get_job_logs("react-ray-test")
    assert "corpus: 80 pairs" in logs and "embed: 2 input shards" in logs
    # The job wrote where it was told; its outputs are complete and consistent.
    found, _ = load_embeddings(str(out / "embeddings"))
    assert sorted(found.tolist()) == sorted(
        int(ids.encode(s, r)) for s in (0, 1) for r in range(40)
    )
    index = ShardedIndex(str(out / "index"), expect_model="react-micro")
    assert index.ntotal == 80
    info = client.get_job_info("react-ray-test")
    assert info.runtime_env.get("working_dir", "").startswith(("gcs://", "_ray_pkg")), (
        info.runtime_env
    )
    assert json.loads((out / "embeddings" / "_summary.json").read_text())["rows_embedded"] == 80

"""The README's commands are tests too: the demo runs and reports what it measured."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL)
    assert blocks[0].strip().splitlines() == ["./run demo", "./run test"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec ./run test")


def _demo(tmp_path, *overrides: str, timeout: int) -> str:
    react_ray = ROOT / ".venv" / "bin" / "react-ray"
    command = [str(react_ray) if react_ray.exists() else "react-ray", "demo", "--config", "jobs/presets/demo.yaml",
               f"output={tmp_path}", *overrides]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    return out.stdout


def _verdict(stdout: str) -> tuple[float, float]:
    match = re.search(r"by [+-][0-9.]+ points top-1 \(([0-9.]+)% -> ([0-9.]+)%", stdout)
    assert match, stdout[-3000:]
    return float(match.group(1)), float(match.group(2))


def test_demo_runs_every_stage_and_reports(tmp_path):
    """The demo's whole path on a small corpus with few steps (the full run is the slow test below)."""
    stdout = _demo(tmp_path, "corpus.num_shards=2", "corpus.samples_per_shard=120", "corpus.eval_samples_per_class=4",
                   # A 12-step base puts every image within ~0.99 cosine of every other: only exact copies go.
                   "corpus.planted_eval_copies=10", "decontamination_threshold=0.9995",
                   "pretrain.steps=12", "pretrain.batch_size=32", "tune.steps=6", "tune.batch_size=32", timeout=600)
    assert "corpus: 240 pairs" in stdout
    assert re.search(r"full: 12 steps on 1 worker\(s\).*trainable 3,478,913 of 3,478,913", stdout)
    assert "embedding set: 2 shards, 240 rows in, 240 embedded" in stdout
    assert (tmp_path / "embeddings" / "part-000001.done").exists()
    assert "index: 240 vectors in 2 shards" in stdout and (tmp_path / "index" / "manifest.json").exists()
    assert len(re.findall(r"^\s+-?\d\.\d{3}  \d{9}  ", stdout, re.MULTILINE)) == 5  # five hits with metadata
    assert "retrieve shapes: 10 classes x 5 templates" in stdout
    removed = re.search(r"decontamination: removed (\d+) pairs .* within cosine 0.9995 of 40 eval images", stdout)
    assert removed and re.search(r"removed (\d+), missed (\d+); other pairs removed .*: \d+ of \d+", stdout)
    assert "training set" in stdout and "was decontaminated against this eval set" in stdout
    assert re.search(r"materialize: \d+ of \d+ pairs in 1 shards; failed none", stdout)
    assert re.search(r"gated-image: 6 steps on 1 worker\(s\)", stdout)
    base, react = _verdict(stdout)
    assert 0 <= base <= 100 and 0 <= react <= 100
    assert re.search(r"ViT-B-32\s+151,277,313\s+6\s+7,087,874\s+42,527,245", stdout)
    report = (tmp_path / "report.html").read_text()
    assert "REACT gated-image" in report and report.count("data:image/png;base64") == 3
    for name in ("base/model.pt", "react/model.pt", "react/training.png", "evaluation/evaluation.json",
                 "retrieved/gallery.html", "retrieved/decontamination.html", "accuracy.png"):
        assert (tmp_path / name).exists(), name


@pytest.mark.slow
def test_full_demo_react_beats_its_base(tmp_path):
    """`./run demo` as shipped: the customized model must beat its base on the held-out set."""
    start = time.perf_counter()
    stdout = _demo(tmp_path, timeout=1800)
    base, react = _verdict(stdout)
    print(f"demo: base {base:.2f}% -> REACT {react:.2f}% in {time.perf_counter() - start:.0f}s")
    assert react >= base + 2.0

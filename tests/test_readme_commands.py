"""The README's commands are tests too: the demo runs and reports what it measured."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert blocks[0].strip().splitlines() == ["./run demo", "./run test"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec ./run test")


def test_demo_runs_and_reports(tmp_path):
    react_ray = ROOT / ".venv" / "bin" / "react-ray"
    command = [str(react_ray) if react_ray.exists() else "react-ray", "demo", "--config", "jobs/presets/demo.yaml",
               f"output={tmp_path}", "corpus.num_shards=1", "corpus.samples_per_shard=50",
               "corpus.eval_samples_per_class=4"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    gap = float(re.search(r"max \|image feature gap\| = ([0-9.e+-]+)", out.stdout).group(1))
    assert gap < 1e-5
    assert re.search(r"ViT-B-32\s+151,277,313\s+6\s+7,087,874\s+42,527,245", out.stdout)
    assert "corpus: 50 pairs" in out.stdout
    assert "embedding set: 1 shards, 50 rows in, 50 embedded" in out.stdout
    assert (tmp_path / "embeddings" / "part-000000.done").exists()
    assert "index: 50 vectors in 1 shards" in out.stdout and (tmp_path / "index" / "manifest.json").exists()
    assert "retrieve shapes: 10 classes x 5 templates" in out.stdout
    assert "shapes" in (tmp_path / "retrieved" / "gallery.html").read_text()
    assert re.search(r"materialize: \d+ of \d+ pairs in 1 shards; failed none", out.stdout)
    assert len(re.findall(r"^\s+-?\d\.\d{3}  \d{9}  ", out.stdout, re.M)) == 5  # five hits with metadata
    assert "<table>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "corpus" / "preview.html").stat().st_size > 10_000

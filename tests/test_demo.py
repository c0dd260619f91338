"""The demo's own rules (its full run is tests/test_readme_commands.py)."""

from __future__ import annotations

import pytest

from react_ray.config import ConfigError, DemoConfig, load_config
from react_ray.demo import MARKER, start_fresh


def test_a_rerun_clears_only_an_earlier_demos_folder(tmp_path):
    """Every stage resumes what it finds: a demo over an earlier one must start from nothing."""
    config = DemoConfig(output=str(tmp_path / "demo"))
    start_fresh(config)
    (tmp_path / "demo" / "base").mkdir()
    (tmp_path / "demo" / "base" / "model.pt").write_bytes(b"old")
    start_fresh(config)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [MARKER]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty and holds no earlier demo"):
        start_fresh(DemoConfig(output=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_the_base_never_sees_the_retrieval_corpus():
    with pytest.raises(
        ConfigError, match="the base must not be pre-trained on the pairs retrieval draws from"
    ):
        load_config(DemoConfig, None, ["base_corpus.seed=0", "corpus.seed=0"])

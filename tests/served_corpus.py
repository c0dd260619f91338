"""The small real corpus both Serve test modules search: generated images and captions, embedded
by the real react-micro model, in exact (Flat) image and text indices of two shards each."""

from __future__ import annotations

from pathlib import Path

from react_ray.config import CorpusConfig, EmbedConfig, GenerateConfig, IndexConfig, ModelConfig
from react_ray.jobs.embed import run_embedding
from react_ray.jobs.index import build_index
from react_ray.synthetic.corpus import generate_corpus

MODEL = ModelConfig(name="react-micro")


def build_served_corpus(root: Path) -> dict[str, str]:
    """-> {"image": index URI, "text": index URI}; the embeddings are under root / "emb"."""
    generate_corpus(
        GenerateConfig(
            output=str(root / "corpus"),
            corpus=CorpusConfig(
                num_shards=2, samples_per_shard=40, eval_samples_per_class=1, formats=["webdataset"]
            ),
        ),
        progress=False,
    )
    run_embedding(
        EmbedConfig(
            input=str(root / "corpus" / "webdataset"),
            output=str(root / "emb"),
            model=MODEL,
            batch_size=32,
            decode={"num_cpus": 0.5},
            pool={"num_cpus": 0.5},
        ),
        progress=False,
    )
    return {
        keys: flat_index(root / "emb", root / f"index-{keys}", keys=keys, num_shards=2)
        for keys in ("image", "text")
    }


def flat_index(embeddings: Path, output: Path, **options) -> str:
    """An exact (IDMap,Flat) index over ``embeddings``, quickly tuned; -> its URI."""
    build_index(
        IndexConfig(
            embeddings=str(embeddings),
            output=str(output),
            factory="IDMap,Flat",
            tune_queries=10,
            tasks={"num_cpus": 0.5},
            **options,
        )
    )
    return str(output)

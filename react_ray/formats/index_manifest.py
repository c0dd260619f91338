"""The index manifest: what a sharded index holds and how to search it.

```
INDEX/manifest.json          IndexManifest, swapped atomically: what readers load
INDEX/manifest-v3.json       every published version, kept
INDEX/shard-00000.index      faiss shards, immutable once a manifest lists them
INDEX/metadata/              id -> url, caption, LAION columns (one Arrow file per embedding file)
```
The build writes the manifest last; an append publishes the next version.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from react_ray.formats import storage
from react_ray.formats.contract import read_contract

MANIFEST_FILE = "manifest.json"


class IndexShard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    count: int
    bytes: int
    sha256: str
    embedding_files: list[str]  # the committed embedding files whose vectors it holds


class IndexAppend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: int
    vectors: int
    drift: dict | None  # quantization drift of the new vectors (index.build.quantization_drift)
    seconds: float


class IndexManifest(BaseModel):
    """``manifest.json``: model, keys, faiss factory, tuned search parameters and the shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["react-ray-index/1"] = "react-ray-index/1"
    version: int = Field(default=1, ge=1)  # one more with every append
    model: str
    pretrained: str | None = None
    checkpoint: str | None = None
    dim: int
    metric: Literal["inner_product"] = "inner_product"
    keys: Literal["image", "text"]
    key_column: str
    factory: str
    plan: str  # why this factory
    ntotal: int
    shards: list[IndexShard]
    ids: dict[str, str | int | None]  # layout, source_id
    metadata: str = "metadata/"
    embeddings: str  # the embedding set it was built from
    train_samples: int
    search_params: dict[str, int | float] = {}
    tuning: dict | None = None  # the recall curve the search parameters were chosen from
    build_seconds: float = 0.0
    seconds: dict[str, float] = {}
    appends: list[IndexAppend] = []

    @staticmethod
    def uri(index_uri: str) -> str:
        """``index_uri`` is the index folder, or one manifest file in it (``manifest-v1.json``)."""
        return index_uri if index_uri.endswith(".json") else storage.join(index_uri, MANIFEST_FILE)

    @classmethod
    def read(cls, index_uri: str) -> IndexManifest:
        missing = "no index manifest (was `react-ray index` run to completion?)"
        return read_contract(cls, cls.uri(index_uri), missing)

    def publish(self, output: str) -> None:
        """Keep ``manifest-vN.json``, then swap ``manifest.json`` in one atomic write: a reader sees
        the previous version or this one, never a mix (shard files are immutable once listed)."""
        text = self.model_dump_json(indent=1)
        storage.write_text_atomic(storage.join(output, f"manifest-v{self.version}.json"), text)
        storage.write_text_atomic(storage.join(output, MANIFEST_FILE), text)

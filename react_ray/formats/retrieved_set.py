"""The retrieved set: the pairs retrieval chose for a task, and how it chose them.

```
OUTPUT/retrieved.parquet       one row per pair: id, key, url, caption, label, class, score, ...
OUTPUT/summary.csv             classes x steps: pairs per class after each step
OUTPUT/retrieval.json          RetrievalRecord: the task, each step's count, the decontamination
OUTPUT/decontamination.parquet the pairs decontamination removed (when it ran)
```
Materialization reads the pairs; the evaluation report reads the decontamination decision.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from react_ray.formats import storage
from react_ray.formats.contract import read_contract
from react_ray.formats.embedding_set import write_parquet

PAIRS_FILE, SUMMARY_FILE, RECORD_FILE = "retrieved.parquet", "summary.csv", "retrieval.json"


class DecontaminationRecord(BaseModel):
    """What decontamination removed, against which eval sets, at which cosine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_sets: list[str]
    embedding_sets: list[str]
    eval_images: int
    eval_images_not_embedded: dict[str, int]  # by reason: these were not checked
    threshold: float
    captions: bool
    removed: int
    removed_by_reason: dict[str, int]
    removed_per_class: dict[str, int]
    closest_kept_cosine: float | None


class RetrievalStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    pairs: int


class RetrievalRecord(BaseModel):
    """``retrieval.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    task: dict  # the TaskSpec, as given
    steps: list[RetrievalStep]
    pairs: int
    decontamination: DecontaminationRecord | None = None

    @classmethod
    def read(cls, retrieved: str) -> RetrievalRecord:
        """``retrieved`` is the set's folder or its ``retrieval.json``."""
        uri = retrieved if retrieved.endswith(".json") else storage.join(retrieved, RECORD_FILE)
        missing = "no retrieval record (was `react-ray retrieve` run to completion?)"
        return read_contract(cls, uri, missing)


def pairs_uri(retrieved: str) -> str:
    """The pairs file of a retrieved set's folder; a ``.parquet`` path (any URL list) as given."""
    return retrieved if retrieved.endswith(".parquet") else storage.join(retrieved, PAIRS_FILE)


def write_record(output: str, summary: pd.DataFrame, record: RetrievalRecord) -> None:
    """The summary, then the record: written after the pairs, so a folder with
    ``retrieval.json`` is complete."""
    storage.write_text_atomic(
        storage.join(output, SUMMARY_FILE), summary.to_csv(index_label="class")
    )
    storage.write_text_atomic(storage.join(output, RECORD_FILE), record.model_dump_json(indent=1))


def write_retrieved_set(
    output: str, pairs: pd.DataFrame, summary: pd.DataFrame, record: RetrievalRecord
) -> None:
    """The pairs first, the record last: a folder with ``retrieval.json`` is complete."""
    write_parquet(pairs_uri(output), pa.Table.from_pandas(pairs, preserve_index=False))
    write_record(output, summary, record)

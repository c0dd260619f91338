"""Decontamination: remove retrieved pairs that are near-copies of evaluation images.

Web crawls hold copies of benchmark images (re-encoded, resized, cropped, with captions of
their own). Tuning on them inflates zero-shot numbers, so before a retrieved set is
materialized every pair whose image embedding has cosine >= ``threshold`` with any
evaluation image is removed (exact search over all eval images, in batches), and, with
``captions: true``, every pair whose caption repeats an eval caption (normalised text).

The eval sets are embedded by the embedding stage itself (resumable, counted skips) with the
corpus's model, or given as embedding sets already. What was removed, beside the eval image
it matched, and the closest pairs kept go to ``decontamination.parquet`` and
``decontamination.html``; the decision goes into ``retrieval.json``, from which the evaluation
report states whether its eval set was covered.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from react_ray.config import DecontaminateConfig, EmbedConfig, ModelConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import EmbeddingSetInfo, column_matrix, read_parquet, summarize
from react_ray.formats.retrieved_set import DecontaminationRecord, RetrievalRecord
from react_ray.report import data_uri, page, table

REMOVED_COLUMNS = (
    "id",
    "label",
    "class",
    "score",
    "caption",
    "eval_set",
    "eval_id",
    "eval_key",
    "cosine",
    "reason",
)


def eval_input_format(uri: str) -> str:
    """``embeddings`` (an embedding set already), or the embedding stage's input format of an eval
    set."""
    if EmbeddingSetInfo.exists(uri):
        return "embeddings"
    if uri.endswith((".tar", ".parquet")):
        raise ValueError(
            f"decontaminate: eval set {uri} is a file; give the folder that holds its shards"
        )
    if storage.list_files(uri, ".tar"):
        return "webdataset"
    if storage.list_files(uri, ".parquet"):
        return "parquet"
    return "image-folder"


def _work_folder(uri: str, work: str) -> str:
    """Where an eval set is embedded: a folder under ``work`` named after it (and its full URI's
    hash)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1])
    return storage.join(work, f"{name}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}")


def normalized_text(text: str | None) -> str:
    """Lower case, letters and digits only, single spaces: "A Red-Star!" -> "a red star"."""
    return " ".join(re.findall(r"[a-z0-9]+", (text or "").lower()))


@dataclass
class EvalImages:
    """Every embedded image of the eval sets, row-aligned."""

    sets: list[str]
    embedding_sets: list[str]
    set_of: np.ndarray  # index into ``sets`` per row
    ids: np.ndarray
    keys: list[str]
    captions: list[str]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    skipped: dict[str, int]  # eval images that could not be embedded (so not checked), by reason

    @classmethod
    def load(cls, sets: list[str], embedding_sets: list[str]) -> EvalImages:
        parts, skipped = [], {}
        for i, uri in enumerate(embedding_sets):
            tables = [
                read_parquet(f, ["id", "key", "caption", "img_emb"])
                for f in storage.list_files(uri, ".parquet")
            ]
            if not tables:
                raise ValueError(f"decontaminate: {uri} holds no embedded eval images")
            part = pa.concat_tables(tables)
            parts.append((i, part))
            for reason, count in summarize(uri).skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
        return cls(
            sets,
            embedding_sets,
            np.concatenate([np.full(len(p), i) for i, p in parts]),
            np.concatenate([p["id"].to_numpy() for _, p in parts]),
            [k for _, p in parts for k in p["key"].to_pylist()],
            [c or "" for _, p in parts for c in p["caption"].to_pylist()],
            np.concatenate([column_matrix(p, "img_emb") for _, p in parts]).astype(np.float32),
            skipped,
        )


def embed_eval_sets(
    config: DecontaminateConfig,
    model: ModelConfig,
    corpus_embeddings: str,
    work: str,
    progress: bool = True,
) -> EvalImages:
    """Embed each eval set not embedded yet (the embedding stage's wiring, resumable, on the
    connected Ray), check that every set was embedded with the corpus's model, and load them."""
    from react_ray.embed.pipeline import embed_pending, plan_embedding

    corpus = EmbeddingSetInfo.read(corpus_embeddings)
    targets = []
    for uri in config.eval_sets:
        input_format, target = eval_input_format(uri), uri
        if input_format != "embeddings":
            target = _work_folder(uri, work)
            embed_config = EmbedConfig(
                input=uri,
                input_format=input_format,
                output=target,
                model=model,
                caption_required=False,
                batch_size=config.batch_size,
                pool=config.pool,
                precision=config.precision,
            )
            embed_pending(embed_config, plan_embedding(embed_config), progress)
        info = EmbeddingSetInfo.read(target)
        field = info.model_mismatch(corpus)
        if field:
            raise ValueError(
                f"decontaminate: eval set {uri} is embedded with "
                f"{field}={getattr(info, field)!r} but the corpus with "
                f"{field}={getattr(corpus, field)!r}; cosines across models mean nothing"
            )
        targets.append(target)
    return EvalImages.load(list(config.eval_sets), targets)


def nearest_eval_image(
    vectors: np.ndarray, eval_vectors: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each vector, the cosine and row of its closest eval image (exact inner-product
    search)."""
    import faiss

    flat = faiss.IndexFlatIP(eval_vectors.shape[1])
    flat.add(np.ascontiguousarray(eval_vectors, np.float32))
    cosine, row = np.empty(len(vectors), np.float32), np.empty(len(vectors), np.int64)
    for start in range(0, len(vectors), batch):
        found_cos, found_row = flat.search(
            np.ascontiguousarray(vectors[start : start + batch], np.float32), 1
        )
        cosine[start : start + batch], row[start : start + batch] = found_cos[:, 0], found_row[:, 0]
    return cosine, row


class Decontaminator:
    """Removes retrieved pairs too close to an eval image (or repeating an eval caption); keeps
    what it removed, and the closest pairs it kept, for the report."""

    def __init__(self, config: DecontaminateConfig, eval_images: EvalImages, classes: list[str]):
        self.config, self.eval, self.classes = config, eval_images, classes
        self.eval_captions: dict[str, int] = {}  # normalised eval caption -> its first eval row
        if config.captions:
            for row, text in enumerate(map(normalized_text, eval_images.captions)):
                if len(text) >= config.min_caption_chars:  # "image", "untitled" prove nothing
                    self.eval_captions.setdefault(text, row)
        self.removed = pd.DataFrame()
        self.closest_kept = pd.DataFrame()

    def judge(
        self, pairs: pd.DataFrame, vectors: np.ndarray, captions: list[str | None]
    ) -> pd.DataFrame:
        """``pairs`` with, per pair, its closest eval image (cosine, eval_row, eval_set, eval_id,
        eval_key) and ``reason``: "image", "caption", or "" for a pair to keep. ``vectors`` are
        the pairs' image embeddings, row-aligned."""
        cosine, row = nearest_eval_image(vectors, self.eval.vectors, self.config.search_batch)
        by_image = cosine >= self.config.threshold
        caption_row = np.array(
            [self.eval_captions.get(normalized_text(c), -1) for c in captions], np.int64
        )
        by_caption = ~by_image & (caption_row >= 0)
        matched = np.where(by_caption, caption_row, row)
        return pairs.assign(
            **{"class": [self.classes[label] for label in pairs["label"]]},
            caption=captions,
            cosine=cosine,
            reason=np.where(by_image, "image", np.where(by_caption, "caption", "")),
            eval_row=matched,
            eval_set=[self.eval.sets[self.eval.set_of[r]] for r in matched],
            eval_id=self.eval.ids[matched],
            eval_key=[self.eval.keys[r] for r in matched],
        )

    def note(self, judged: pd.DataFrame) -> None:
        """Keep, for the record and the page, the removed pairs and the closest kept ones among
        ``judged`` (rows of :meth:`judge`: all of them, or at least every removed pair and the
        ``report_pairs`` closest kept of each part judged)."""
        removed = judged["reason"] != ""
        self.removed = (
            judged[removed].sort_values(["cosine", "id"], ascending=[False, True])
        ).reset_index(drop=True)
        self.closest_kept = (
            judged[~removed]
            .sort_values(["cosine", "id"], ascending=[False, True])
            .head(self.config.report_pairs)
            .reset_index(drop=True)
        )

    def __call__(
        self, pairs: pd.DataFrame, vectors: np.ndarray, captions: list[str | None]
    ) -> np.ndarray:
        """The mask of pairs to keep (all pairs judged at once)."""
        judged = self.judge(pairs, vectors, captions)
        self.note(judged)
        return (judged["reason"] == "").to_numpy()

    def record(self) -> DecontaminationRecord:
        """The decision, for retrieval.json (and so for the evaluation report)."""
        # no columns when nothing was retrieved
        removed = self.removed.reindex(columns=["label", "reason"])
        per_class = np.bincount(removed["label"].to_numpy(int), minlength=len(self.classes))
        return DecontaminationRecord(
            eval_sets=self.eval.sets,
            embedding_sets=self.eval.embedding_sets,
            eval_images=len(self.eval.ids),
            eval_images_not_embedded=self.eval.skipped,
            threshold=self.config.threshold,
            captions=self.config.captions,
            removed=len(removed),
            removed_by_reason={
                r: int((removed["reason"] == r).sum()) for r in ("image", "caption")
            },
            removed_per_class=dict(zip(self.classes, per_class.tolist())),
            closest_kept_cosine=float(self.closest_kept["cosine"].iloc[0])
            if len(self.closest_kept)
            else None,
        )

    def removed_table(self) -> pa.Table:
        return pa.Table.from_pandas(
            self.removed.reindex(columns=list(REMOVED_COLUMNS)), preserve_index=False
        )

    def html(self, task_name: str, corpus_embeddings: str) -> str:
        """Each removed pair beside the eval image it matched; then the closest pairs kept."""
        from react_ray.retrieve.gallery import corpus_images

        shown = self.removed.head(self.config.report_pairs)
        both = pd.concat([shown, self.closest_kept], ignore_index=True)
        pair_images, eval_images = {}, {}  # eval images by eval row: ids repeat across eval sets
        if len(both):
            pair_images = corpus_images(corpus_embeddings, both)
            wanted = np.unique(both["eval_row"].to_numpy())
            for i, uri in enumerate(self.eval.embedding_sets):
                rows = wanted[self.eval.set_of[wanted] == i]
                by_id = corpus_images(uri, pd.DataFrame({"id": self.eval.ids[rows]}))
                eval_images |= {
                    int(r): by_id[self.eval.ids[r]] for r in rows if self.eval.ids[r] in by_id
                }
        record = self.record()
        not_embedded = record.eval_images_not_embedded
        summary = (
            f"<p>Eval sets: {html.escape(', '.join(self.eval.sets))} ({record.eval_images:,} "
            "images embedded"
            f"{'; not embedded: ' + html.escape(str(not_embedded)) if not_embedded else ''})."
            f" Removed a pair when its image had cosine &ge; {self.config.threshold} with an eval "
            f"image{' or its caption repeated an eval caption' if self.config.captions else ''}: "
            f"<b>{record.removed:,} pairs removed</b> {record.removed_by_reason}.</p>"
        )
        counts = table(["class", "removed"], [[c, n] for c, n in record.removed_per_class.items()])
        return page(
            f"Decontamination of task {task_name}",
            summary
            + counts
            + f"<h2>Removed pairs ({len(self.removed):,}; {len(shown):,} shown)</h2>"
            + _pairs_html(shown, pair_images, eval_images)
            + f"<h2>Closest pairs kept (below {self.config.threshold})</h2>"
            + _pairs_html(self.closest_kept, pair_images, eval_images),
        )


def _set_folder(uri: str) -> str:
    uri = uri.rstrip("/")
    return uri.rsplit("/", 1)[0] if uri.endswith((".tar", ".parquet")) else uri


def decontamination_statement(training_set: str, eval_set: str) -> str:
    """One line for an evaluation report: was the training set decontaminated against this eval
    set?"""
    record = RetrievalRecord.read(training_set).decontamination
    if not record:
        return (
            f"training set {training_set} was NOT decontaminated: "
            "it may hold copies of these eval images"
        )
    covered = _set_folder(eval_set) in {_set_folder(s) for s in record.eval_sets}
    what = (
        f"{record.removed:,} pairs removed ({record.removed_by_reason}) at cosine >= "
        f"{record.threshold} against {record.eval_images:,} eval images"
    )
    if not covered:
        return (
            f"training set {training_set} was decontaminated against {', '.join(record.eval_sets)} "
            f"only, NOT against this eval set ({what})"
        )
    return f"training set {training_set} was decontaminated against this eval set: {what}"


def _pairs_html(
    frame: pd.DataFrame, pair_images: dict[int, bytes], eval_images: dict[int, bytes]
) -> str:
    if not len(frame):
        return "<p>none</p>"

    def image(data: bytes | None, fallback: str) -> str:
        return (
            f"<img src='{data_uri(data)}' width=128>" if data else f"<i>{html.escape(fallback)}</i>"
        )

    rows = "".join(
        f"<tr><td>{r['cosine']:.4f}<br>{r['reason'] or 'kept'}</td>"
        f"<td>{image(pair_images.get(r['id']), str(r['id']))}<br>"
        f"{html.escape(str(r['caption'] or ''))}<br>"
        f"<small>id {r['id']} &middot; {html.escape(r['class'])}</small></td>"
        f"<td>{image(eval_images.get(r['eval_row']), r['eval_key'])}<br>"
        f"<small>{html.escape(r['eval_key'])}</small></td></tr>"
        for r in frame.to_dict("records")
    )
    head = "<tr><th>cosine / reason</th><th>retrieved pair</th><th>eval image</th></tr>"
    return f"<table>{head}{rows}</table>"

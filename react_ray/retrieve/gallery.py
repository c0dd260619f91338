"""An HTML page per retrieved set: sample pairs per class, images from the corpus when it has
them."""

from __future__ import annotations

import html

import pandas as pd

from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import EmbeddingSetInfo, read_stats, shard_name
from react_ray.formats.readers import IMAGE_FORMATS, InputShard, read_shard
from react_ray.formats.shard_writer import stats_uri
from react_ray.report import grid, page, table


def corpus_images(embeddings: str, wanted: pd.DataFrame) -> dict[int, bytes]:
    """Image bytes of the wanted ids, read from the input shards the embedding stage recorded."""
    info = EmbeddingSetInfo.read(embeddings)
    if info.input_format not in IMAGE_FORMATS:
        return {}  # metadata-only corpora: the page links the URLs instead
    images = {}
    _, shards, _ = ids.decode(wanted["id"].to_numpy())
    for shard in sorted(set(shards.tolist())):
        if not storage.exists(stats_uri(embeddings, shard_name(shard))):
            continue
        source = read_stats(embeddings, shard_name(shard)).input
        keep = set(wanted["id"][shards == shard].tolist())
        for block in read_shard(InputShard(source, shard, info.input_format), info.source_id):
            images.update({r["id"]: r["image"] for r in block if r["id"] in keep and r["image"]})
    return images


def gallery_html(
    task_name: str, pairs: pd.DataFrame, summary: pd.DataFrame, embeddings: str, per_class: int
) -> str:
    """``pairs``: the best of each class (all of them, or at least ``per_class``); ``summary``:
    classes x steps, whose last column is each class's count."""
    sample = pairs.groupby("label", sort=True).head(per_class)
    images = corpus_images(embeddings, sample)
    sections = [
        table(
            ["class", *summary.columns],
            [[name, *row] for name, row in zip(summary.index, summary.values)],
        )
    ]
    for label, group in sample.groupby("label", sort=True):
        items = [
            (
                images[r.id],
                [r.caption or "", f"score {r.score:.3f} ({r.source})", f"query: {r.best_query}"],
            )
            for r in group.itertuples()
            if r.id in images
        ]
        links = "".join(
            f"<li><a href='{html.escape(r.url or '')}'>{html.escape(r.caption or '')}</a> "
            f"({r.score:.3f})</li>"
            for r in group.itertuples()
            if r.id not in images
        )
        name = html.escape(group["class"].iloc[0])
        sections.append(
            f"<h2>{name}: {int(summary.iloc[label, -1])} pairs</h2>{grid(items)}"
            + (f"<ul>{links}</ul>" if links else "")
        )
    return page(f"Retrieved for task {task_name}", "".join(sections))

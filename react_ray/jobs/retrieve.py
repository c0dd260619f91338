"""``react-ray retrieve``: a task's training pairs from its class names, as a retrieved set."""

from __future__ import annotations

import pandas as pd

from react_ray.config import RetrieveConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import write_parquet
from react_ray.index.sharded import ShardedIndex
from react_ray.leases import holds_lease
from react_ray.models import build_model
from react_ray.ray_utils import connect
from react_ray.retrieve.decontaminate import Decontaminator, embed_eval_sets
from react_ray.retrieve.gallery import gallery_html
from react_ray.retrieve.retrieval import StepLog, retrieve, summary_table, write_outputs
from react_ray.retrieve.task import load_task


@holds_lease("retrieve")
def run_retrieval(config: RetrieveConfig) -> tuple[pd.DataFrame, StepLog]:
    """Load task, model and indices, retrieve, write the retrieved set, its gallery and the
    decontamination page."""
    spec = load_task(config.task)
    clip = build_model(config.model)
    indices = {
        source: ShardedIndex(uri, expect_model=config.model.name, expect_dim=clip.embed_dim)
        for source, uri in (("image", config.image_index), ("text", config.text_index))
        if uri
    }
    embeddings = next(iter(indices.values())).manifest.embeddings
    decontaminator = None
    if config.decontaminate:
        work = config.decontaminate.embeddings or storage.join(config.output, "eval-embeddings")
        connect(config.ray_address)  # eval sets are embedded on Ray
        eval_images = embed_eval_sets(config.decontaminate, config.model, embeddings, work)
        decontaminator = Decontaminator(config.decontaminate, eval_images, spec.classes)
    pairs, log = retrieve(
        spec, indices, lambda texts: clip.encode_texts(texts).numpy(), decontaminator
    )
    record = decontaminator.record() if decontaminator else None
    write_outputs(config.output, spec, pairs, log, record)
    if decontaminator:
        write_parquet(
            storage.join(config.output, "decontamination.parquet"), decontaminator.removed_table()
        )
        storage.write_text_atomic(
            storage.join(config.output, "decontamination.html"),
            decontaminator.html(spec.name, embeddings),
        )
    if config.gallery_per_class:
        storage.write_text_atomic(
            storage.join(config.output, "gallery.html"),
            gallery_html(
                spec.name, pairs, summary_table(log), embeddings, config.gallery_per_class
            ),
        )
    print(
        f"retrieve {spec.name}: {len(spec.classes)} classes x {len(spec.template_list)} templates, "
        f"k={spec.k_per_prompt}, {spec.mode}\n{log}\n-> {config.output}"
    )
    if record:
        print(
            f"decontamination: removed {record.removed:,} pairs {record.removed_by_reason} within "
            f"cosine {record.threshold} of {record.eval_images:,} eval images; closest kept "
            f"{record.closest_kept_cosine}; see decontamination.html"
        )
    return pairs, log

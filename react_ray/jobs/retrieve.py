"""``react-ray retrieve``: a task's training pairs from its class names, as a retrieved set."""

from __future__ import annotations

from react_ray.config import RetrieveConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import write_parquet
from react_ray.formats.index_manifest import IndexManifest
from react_ray.formats.retrieved_set import RetrievalRecord, RetrievalStep, write_record
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect
from react_ray.retrieve.decontaminate import Decontaminator, embed_eval_sets
from react_ray.retrieve.gallery import gallery_html
from react_ray.retrieve.on_ray import RetrievedOnRay, retrieve_on_ray
from react_ray.retrieve.retrieval import summary_table
from react_ray.retrieve.task import load_task


@holds_lease("retrieve")
def run_retrieval(config: RetrieveConfig) -> RetrievedOnRay:
    """Load the task, retrieve on Ray (the driver sees counts), write the retrieved set's record,
    summary, gallery and decontamination page."""
    spec = load_task(config.task)
    embeddings = IndexManifest.read(config.image_index or config.text_index).embeddings
    connect(config.ray_address)
    decontaminator, eval_images = None, None
    if config.decontaminate:
        work = config.decontaminate.embeddings or storage.join(config.output, "eval-embeddings")
        eval_images = embed_eval_sets(config.decontaminate, config.model, embeddings, work)
        decontaminator = Decontaminator(config.decontaminate, eval_images, spec.classes)
    result = retrieve_on_ray(spec, config, decontaminator, eval_images, config.gallery_per_class)
    log = result.log
    record = RetrievalRecord(
        task=spec.model_dump(mode="json"),
        steps=[RetrievalStep(step=s, pairs=n) for s, n, _ in log.steps],
        pairs=result.pairs,
        decontamination=decontaminator.record() if decontaminator else None,
    )
    write_record(config.output, summary_table(log), record)
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
                spec.name, result.gallery, summary_table(log), embeddings, config.gallery_per_class
            ),
        )
    stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in result.seconds.items())
    print(
        f"retrieve {spec.name}: {len(spec.classes)} classes x {len(spec.template_list)} templates, "
        f"k={spec.k_per_prompt}, {spec.mode}\n{log}\n({stages})\n-> {config.output}"
    )
    if record.decontamination:
        d = record.decontamination
        print(
            f"decontamination: removed {d.removed:,} pairs {d.removed_by_reason} within "
            f"cosine {d.threshold} of {d.eval_images:,} eval images; closest kept "
            f"{d.closest_kept_cosine}; see decontamination.html"
        )
    return result

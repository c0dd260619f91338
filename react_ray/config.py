"""Typed, validated configuration: one pydantic model per stage, YAML presets, CLI overrides.

``load_config(GenerateConfig, "jobs/presets/generate_demo.yaml", ["corpus.num_shards=8"])``
returns a validated ``GenerateConfig`` or raises :class:`ConfigError` whose message names
the field, the bad value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, model_validator

from react_ray.fields import (
    MAX_IMAGE_PIXELS,
    ActorPool,
    ConfigError,
    MaxImagePixels,
    Network,
    Precision,
    RayAddress,
    Resources,
    StrictModel,
    TuningMode,
    Uri,
    check_half_precision,
)
from react_ray.models.config import ModelConfig


class CorpusConfig(StrictModel):
    """The synthetic LAION-style corpus (see ``react_ray.synthetic.corpus``)."""

    num_shards: int = Field(default=4, ge=1)
    samples_per_shard: int = Field(default=500, ge=1, le=10_000)  # img2dataset keys: 4 row digits
    image_size: int = Field(default=64, ge=16, le=1024)
    seed: int = 0
    no_shape_fraction: float = Field(
        default=0.08,
        ge=0,
        lt=1,
        description="pairs whose image shows only a texture, no object of the task",
    )
    formats: list[Literal["webdataset", "parquet", "laion-metadata"]] = Field(
        default_factory=lambda: ["webdataset", "parquet", "laion-metadata"], min_length=1
    )
    url_base: str = "https://images.react-ray.invalid"
    eval_samples_per_class: int = Field(default=40, ge=1)
    planted_eval_copies: int = Field(
        default=0,
        ge=0,
        description="corpus pairs that are near-copies of eval images "
        "(re-encoded, resized, cropped), to test decontamination",
    )
    write_images: bool = Field(
        default=False, description="also write images/<key>.jpg, for serving them over HTTP"
    )


class GenerateConfig(StrictModel):
    output: Uri = "runs/demo/corpus"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)


class DemoTrainingConfig(StrictModel):
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(default=128, ge=2)
    warmup_steps: int = Field(default=50, ge=0)


class DemoConfig(StrictModel):
    """The end-to-end demo: pre-train a small base CLIP on one corpus, then REACT it for the shapes
    task with pairs retrieved from another, larger one (REACT: CLIP pre-trained on WIT-400M,
    retrieval from LAION-400M, which the base never saw)."""

    output: Uri = "runs/demo"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="react-mini"))
    base_corpus: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(
            num_shards=8,
            seed=1,
            no_shape_fraction=0.5,
            eval_samples_per_class=1,
            formats=["webdataset"],
        ),
        description="the base CLIP's pre-training pairs: general data, the task's objects rarer",
    )
    corpus: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(
            num_shards=20, eval_samples_per_class=300, planted_eval_copies=50
        ),
        description="the retrieval corpus (LAION's role), larger, and the held-out eval set",
    )
    seed: int = Field(
        default=0, ge=0, description="training seed: the same config gives the same numbers"
    )
    pretrain: DemoTrainingConfig = Field(
        default_factory=lambda: DemoTrainingConfig(steps=450, lr=2e-3)
    )
    tune: DemoTrainingConfig = Field(default_factory=lambda: DemoTrainingConfig(steps=300, lr=5e-3))
    tuning_mode: TuningMode = "gated-image"
    decontamination_threshold: float | None = Field(
        default=0.995,
        gt=0,
        le=1,
        description="remove retrieved pairs this close to an eval image (None: keep all); "
        "the demo's tiny CLIP needs more than the 0.95 default (docs)",
    )
    ray_address: str | None = Field(
        default="local", description="'local' starts a private Ray for the demo"
    )

    @model_validator(mode="after")
    def _distinct_corpora(self) -> DemoConfig:
        if self.base_corpus.seed == self.corpus.seed:
            raise ValueError(
                f"base_corpus.seed and corpus.seed are both {self.corpus.seed}: the base must not "
                "be pre-trained on the pairs retrieval draws from (REACT's base never saw LAION)"
            )
        return self


InputFormat = Literal["webdataset", "parquet", "image-folder", "laion-embeddings"]


class EmbedConfig(StrictModel):
    """Stage 1: every image-text pair -> image + caption embeddings, per input shard."""

    input: Uri = Field(description="directory of input shards (local or s3://)")
    input_format: InputFormat = "webdataset"
    output: Uri = Field(description="embedding directory (local or s3://)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    precision: Precision = "fp32"
    batch_size: int = Field(default=256, ge=1, description="images per model forward")
    pool: ActorPool = Field(default_factory=ActorPool, description="the model actors")
    decode: Resources = Field(
        default_factory=Resources,
        description="each read / decode task (custom: {cpu_node: 1} "
        "keeps decoding on the CPU node group, cluster/)",
    )
    decode_in_actor: bool = Field(
        default=False,
        description="decode + tokenize in the model actors, not in CPU tasks: for CPU-only pools, "
        "whose own cores would decode anyway (no pixels between processes, no decode process "
        "preempting the model's threads); GPU actors leave it to CPU tasks",
    )
    read_block_rows: int = Field(
        default=256,
        ge=1,
        description="records per block out of a read + decode task "
        "(decoded: rows x S x S x 3 bytes)",
    )
    max_image_pixels: MaxImagePixels = MAX_IMAGE_PIXELS
    caption_required: bool = Field(
        default=True,
        description="false: images without a caption are embedded too "
        "(evaluation sets; their txt_emb is of the empty text)",
    )
    source_id: int = Field(default=0, ge=0, le=2047, description="tells corpora apart inside ids")
    max_shards: int | None = Field(
        default=None, ge=1, description="embed only the first N pending shards"
    )
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _precision_needs_gpu(self) -> EmbedConfig:
        check_half_precision(self.precision, self.pool.num_gpus, "pool.num_gpus")
        return self


class IndexConfig(StrictModel):
    """Stage 2: an embedding set -> a sharded FAISS index with a manifest."""

    embeddings: Uri = Field(
        description="embedding set written by `react-ray embed` (local or s3://)"
    )
    output: Uri = Field(description="index directory (local or s3://)")
    keys: Literal["image", "text"] = Field(
        default="image",
        description="index image embeddings (text-to-image) or caption embeddings (text-to-text)",
    )
    factory: str | None = Field(
        default=None, description="FAISS index_factory string; empty: planned from N, dim, budget"
    )
    memory_budget_gb: float = Field(default=16.0, gt=0)
    num_shards: int = Field(default=1, ge=1)
    files_per_task: int = Field(
        default=8, ge=1, description="embedding files added by one build task"
    )
    train_samples: int = Field(
        default=100_000,
        ge=1,
        description="uniform random training sample size; IVF builds draw at least 64 per coarse "
        "list (up to 2M)",
    )
    seed: int = 0
    use_gpu: bool = Field(
        default=False, description="train and add on GPUs (needs a GPU faiss build)"
    )
    target_recall: float = Field(
        default=0.95, gt=0, le=1, description="recall@k of text queries to tune for"
    )
    recall_k: int = Field(default=10, ge=1)
    tune_queries: int = Field(default=500, ge=1)
    tasks: Resources = Field(
        default_factory=Resources, description="each sample / build / merge task"
    )
    append: bool = Field(
        default=False,
        description="add the embedding files the index lacks (same trained "
        "quantizer, new shards, next manifest version)",
    )
    ray_address: RayAddress = None


class DecontaminateConfig(StrictModel):
    """Remove retrieved pairs that are near-copies of evaluation images
    (react_ray/retrieve/decontaminate.py)."""

    eval_sets: list[Uri] = Field(
        min_length=1,
        description="evaluation sets (webdataset, image folder or parquet with "
        "image bytes, or their embedding sets), local or s3://",
    )
    threshold: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="remove a pair whose image has cosine >= this with any eval image",
    )
    captions: bool = Field(
        default=False, description="also remove pairs whose caption repeats an eval caption"
    )
    min_caption_chars: int = Field(
        default=12, ge=1, description="shorter eval captions ('image') are not matched"
    )
    embeddings: Uri | None = Field(
        default=None, description="where eval sets are embedded (default OUTPUT/eval-embeddings)"
    )
    batch_size: int = Field(default=256, ge=1, description="eval images per model forward")
    pool: ActorPool = Field(
        default_factory=ActorPool, description="the model actors embedding eval sets"
    )
    precision: Precision = "fp32"
    search_batch: int = Field(
        default=16384, ge=1, description="retrieved vectors per exact search call"
    )
    report_pairs: int = Field(
        default=100, ge=0, description="removed (and closest kept) pairs shown in the HTML page"
    )

    @model_validator(mode="after")
    def _precision_needs_gpu(self) -> DecontaminateConfig:
        check_half_precision(self.precision, self.pool.num_gpus, "pool.num_gpus")
        return self


class RetrieveConfig(StrictModel):
    """Stage 3: a task spec + index(es) -> the task's retrieved, deduplicated training pairs."""

    task: Uri = Field(description="task spec YAML (local or s3://), see react_ray/retrieve/task.py")
    image_index: Uri | None = Field(
        default=None, description="index over image embeddings (text-to-image)"
    )
    text_index: Uri | None = Field(
        default=None, description="index over caption embeddings (text-to-text)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    output: Uri = Field(description="directory for retrieved.parquet, summary.csv, gallery.html")
    gallery_per_class: int = Field(default=8, ge=0)
    decontaminate: DecontaminateConfig | None = Field(
        default=None, description="remove near-copies of eval images"
    )
    encoders: ActorPool = Field(
        default_factory=ActorPool, description="the model actors encoding the prompts"
    )
    searchers: ActorPool = Field(
        default_factory=ActorPool,
        description="the actors searching the index(es), one pool per shard group; each holds "
        "its group of every index in memory",
    )
    search_groups: int = Field(
        default=1,
        ge=1,
        description="split the index shards into this many groups, each searched by its own "
        "pool: for an index larger than one node's memory",
    )
    workers: ActorPool = Field(
        default_factory=lambda: ActorPool(max_actors=4),
        description="the actors running the per-file steps (merge, filters, cross-class rule, "
        "vectors, decontamination)",
    )
    tasks: Resources = Field(
        default_factory=Resources,
        description="each near-duplicate, per-class and final task",
    )
    ray_address: RayAddress = None


class MaterializeConfig(StrictModel):
    """Stage 3b: a retrieved set -> labeled webdataset training shards (corpus bytes or URL
    downloads)."""

    retrieved: Uri = Field(
        description="retrieved.parquet (or the directory holding it), or any parquet of URLs "
        "and captions such as REACT's imagenet_10m.parquet (URL, TEXT)"
    )
    output: Uri
    source: Literal["corpus", "download"] = "corpus"
    url_col: str = Field(default="url", description="img2dataset's url_col (REACT's file: URL)")
    caption_col: str = Field(
        default="caption", description="img2dataset's caption_col (REACT's file: TEXT)"
    )
    embeddings: Uri | None = Field(
        default=None, description="embedding set (source=corpus finds images via it)"
    )
    samples_per_shard: int = Field(default=1000, ge=1, le=10_000)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        default="keep_ratio", description="img2dataset's: keep_ratio = shortest side to image_size"
    )
    image_size: int = Field(default=384, ge=8)
    resize_only_if_bigger: bool = True
    skip_reencode: bool = Field(
        default=False, description="keep a JPEG's bytes when it needs no resizing"
    )
    threads: int = Field(default=16, ge=1, description="concurrent downloads per task")
    timeout: float = Field(default=10.0, gt=0, description="per connect / read")
    deadline: float = Field(
        default=60.0, gt=0, description="one sample's whole fetch, redirects and retries included"
    )
    allowed_networks: list[Network] = Field(
        default_factory=list,
        description="non-public networks (CIDR) URLs may "
        "point into (a private mirror); by default public addresses only",
    )
    retries: int = Field(default=2, ge=0)
    backoff: float = Field(default=0.5, ge=0)
    max_bytes: int = Field(default=20 * 2**20, ge=1)
    max_image_pixels: MaxImagePixels = MAX_IMAGE_PIXELS
    retry_failed: bool = Field(
        default=False, description="fetch again only what an earlier run failed"
    )
    tasks: Resources = Field(
        default_factory=Resources, description="each shard's fetch-and-write task"
    )
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _corpus_needs_embeddings(self) -> MaterializeConfig:
        if self.source == "corpus" and not self.embeddings:
            raise ValueError(
                "source=corpus needs embeddings: the embedding "
                "set whose stats name the corpus shards"
            )
        return self


class AugmentConfig(StrictModel):
    """Training augmentations: timm's train transform on the decoded image. The defaults are REACT's
    released aug-cfg (react_customization/README.md, both modes); see docs/react-parity.md."""

    enabled: bool = Field(default=True, description="false: the eval transform (deterministic)")
    scale: tuple[float, float] = Field(
        default=(0.08, 1.0), description="RandomResizedCrop area range"
    )
    ratio: tuple[float, float] = Field(
        default=(0.75, 1.3333333), description="RandomResizedCrop aspect range"
    )
    hflip: float = Field(default=0.5, ge=0, le=1, description="horizontal flip probability")
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    color_jitter: float | None = Field(
        default=0.4, ge=0, description="timm applies it only without auto_augment"
    )
    auto_augment: str | None = Field(
        default="rand-m9-mstd0.5-inc1", description="timm policy; null: none"
    )
    re_prob: float = Field(default=0.25, ge=0, le=1, description="random erasing probability")
    re_count: int = Field(default=1, ge=1, description="random erasing regions")
    decode_short_side: int = Field(
        default=384,
        ge=8,
        description="decoded images keep their aspect ratio, the shorter side resized down to "
        "this when longer (REACT's shards: img2dataset "
        "384 px); the crop is drawn from that whole image",
    )


class OptimConfig(StrictModel):
    """AdamW with REACT's betas/eps and weight-decay exclusions, linear warmup then cosine."""

    lr: float | None = Field(
        default=None, gt=0, description="None: REACT's 5e-4 (gated-image, full), 5e-5 (locked-text)"
    )
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=5000, ge=0, description="REACT: 5000")
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1, description="cosine floor as a fraction of lr"
    )

    def peak_lr(self, mode: str) -> float:
        return self.lr if self.lr is not None else (5e-5 if mode == "locked-text" else 5e-4)


class TrainConfig(StrictModel):
    """Stage 4: REACT customization (or pre-training, mode=full) on Ray Train from webdataset
    shards."""

    data: Uri = Field(
        description="directory of webdataset training shards (materialized set or a corpus)"
    )
    output: Uri = Field(
        description="run directory: checkpoints, model.pt, metrics.jsonl, training.png"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    mode: TuningMode = "gated-image"
    steps: int = Field(
        default=1000, ge=1, description="optimizer steps (set from epochs when given)"
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        description="with samples_per_epoch: steps = epochs x ceil(samples_per_epoch / batch_size)",
    )
    samples_per_epoch: int | None = Field(
        default=None, ge=1, description="REACT's --train-num-samples"
    )
    batch_size: int = Field(
        default=4096, ge=2, description="global batch, split evenly over workers (REACT: 4096)"
    )
    workers: int = Field(default=1, ge=1)
    worker: Resources = Field(
        default_factory=Resources, description="each training worker (num_gpus: 1 per GPU)"
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch threads per CPU worker; None: worker.num_cpus"
    )
    precision: Precision = Field(default="fp32", description="fp16/bf16: autocast on GPU (AMP)")
    grad_checkpointing: bool = Field(
        default=True, description="recompute the gated blocks' activations in backward (REACT: on)"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(
        default=3, ge=-1, description="worker-group restarts from the last checkpoint; -1: no limit"
    )
    log_every: int = Field(default=10, ge=1)
    data_sharding: Literal["stream", "slice"] = Field(
        default="stream",
        description="stream: Ray Data splits the stream over workers; slice: every worker reads "
        "the whole ordered stream and keeps its slice of "
        "each global batch (reproducible, costs N x reading)",
    )
    cache_decoded: bool = Field(
        default=False, description="decode once and keep pixels in the object store"
    )
    augment_in_worker: bool = Field(
        default=False,
        description="augment + tokenize in the training workers, not in Ray Data tasks: for CPU "
        "workers, whose own cores would do it anyway; GPU workers leave it to CPU tasks",
    )
    shuffle_buffer: int = Field(
        default=2000, ge=0, description="local shuffle buffer per worker (0: off)"
    )
    decode: Resources = Field(
        default_factory=Resources, description="each read / decode / augment task"
    )
    max_image_pixels: MaxImagePixels = MAX_IMAGE_PIXELS
    seed: int | None = Field(
        default=None,
        ge=0,
        description="fix model init, data order, shuffle and augmentation "
        "(a one-worker run, or data_sharding=slice, repeats exactly); None: fresh randomness",
    )
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if (self.epochs is None) != (self.samples_per_epoch is None):
            raise ValueError(
                "epochs and samples_per_epoch go together (steps = epochs x batches per epoch)"
            )
        if self.epochs is not None:
            steps = self.epochs * -(-self.samples_per_epoch // self.batch_size)
            if self.steps != steps:
                self.steps = steps  # validate_assignment runs this check again, now consistent
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of workers ({self.workers})"
            )
        if self.seed is not None and self.augment.enabled and not self.augment_in_worker:
            raise ValueError(
                "seed: augmentation in Ray Data tasks draws its own randomness; set "
                "augment_in_worker=true (or augment.enabled=false) for a reproducible run"
            )
        check_half_precision(self.precision, self.worker.num_gpus, "worker.num_gpus")
        return self


class EvaluateConfig(StrictModel):
    """Zero-shot classification of a labeled set by any number of models, in one table."""

    eval_set: Uri = Field(
        description="webdataset dir/tar (KEY.jpg + KEY.cls) or image folder (CLASS/*.jpg); local, s3://"
    )
    task: Uri = Field(
        description="task spec YAML: class names (in label order) and prompt templates"
    )
    models: dict[str, ModelConfig] = Field(
        min_length=1, description="label -> model, e.g. base, react"
    )
    output: Uri
    batch_size: int = Field(default=256, ge=1)
    distributed: Literal["local", "ray"] = Field(
        default="local",
        description="ray: score on a Ray Data actor pool (large sets); local: in this process",
    )
    pool: ActorPool = Field(
        default_factory=lambda: ActorPool(max_actors=4), description="distributed=ray: the scorers"
    )
    training_set: Uri | None = Field(
        default=None,
        description="the retrieved set the tuned models learned from; the report states whether it "
        "was decontaminated against this eval set",
    )
    ray_address: RayAddress = None


# ELEVATER's 20 sets: its dataset name -> our shipped class names / templates and its metric.
ELEVATER_SETS: dict[str, dict] = json.loads(
    (Path(__file__).parent / "resources" / "elevater.json").read_text()
)


class ElevaterConfig(StrictModel):
    """Zero-shot on ELEVATER's 20 image-classification sets (REACT's benchmark), one table for all
    models."""

    root: Uri = Field(
        description="folder holding one eval set per dataset, named as ELEVATER names them "
        "(cifar-10, voc-2007-classification, ...): webdataset or CLASS/*.jpg"
    )
    models: dict[str, ModelConfig] = Field(
        min_length=1, description="label -> model, e.g. base, react"
    )
    output: Uri
    datasets: list[str] | None = Field(
        default=None, description="a subset of the 20 (None: every one under root)"
    )
    batch_size: int = Field(default=256, ge=1)
    distributed: Literal["local", "ray"] = "local"
    pool: ActorPool = Field(
        default_factory=lambda: ActorPool(max_actors=4), description="distributed=ray: the scorers"
    )
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _known(self) -> ElevaterConfig:
        unknown = sorted(set(self.datasets or []) - set(ELEVATER_SETS))
        if unknown:
            raise ValueError(
                f"datasets: {unknown} are not ELEVATER's; its 20: {', '.join(ELEVATER_SETS)}"
            )
        return self


class IndexPair(StrictModel):
    image: Uri | None = Field(
        default=None, description="index over image embeddings (text-to-image)"
    )
    text: Uri | None = Field(
        default=None, description="index over caption embeddings (text-to-text)"
    )


class AccessConfig(StrictModel):
    """Who may call a Serve app (docs/security.md). Tokens come from environment variables (a
    Kubernetes secret on a cluster), read where the app is built, never from a config file."""

    admin_token_env: str = Field(
        default="REACT_RAY_ADMIN_TOKEN",
        description="env var holding the bearer token "
        "for /admin routes; unset: the admin routes are off (403)",
    )
    api_token_env: str = Field(
        default="REACT_RAY_API_TOKEN",
        description="env var holding a bearer token for "
        "the query routes; unset: they are open (health, readiness, the page and docs always are)",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins (e.g. a clip-front host) "
        "allowed to call the API cross-site; other origins' requests are refused",
    )


class SafetyConfig(StrictModel):
    """How the LAION kNN API's ``use_safety_model`` and ``use_violence_detector`` are honoured
    (docs/stages.md, "The LAION kNN API's options")."""

    unsafe_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="use_safety_model drops a hit whose punsafe (LAION-5B's metadata, from "
        "LAION's CLIP NSFW detector) is above this; clip back's safety model uses 0.5",
    )
    unsafe_labels: list[str] = Field(
        default_factory=lambda: ["NSFW"],
        description="...or whose NSFW column (LAION-400M's) is one of these (add UNSURE to be "
        "strict)",
    )
    violence_prompts: Uri | None = Field(
        default=None,
        description="LAION's violence_detection_vit_b_32.npy (or _vit_l_14): a (2, dim) array; a "
        "hit nearer row 1 than row 0 is dropped; None: violence_texts through the app's text tower",
    )
    violence_texts: list[str] = Field(
        default_factory=lambda: ["a photo", "a violent photo of fighting, weapons or blood"],
        min_length=2,
        max_length=2,
        description="[neutral, violent]: the detector's two prompts when no violence_prompts file",
    )


class RetrievalAppConfig(StrictModel):
    indices: dict[str, IndexPair] = Field(
        min_length=1, description="name -> its image and/or text index"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    shard_groups: int = Field(
        default=1, ge=1, description="index replica groups, each holding every G-th shard"
    )
    memory_map: bool = Field(
        default=False,
        description="map the index files instead of reading them into each replica: instant "
        "start and one page cache per node, but IVF shards are then searched side by side, 2-3x "
        "slower per single query (docs/performance.md)",
    )
    batching: bool = True
    max_batch_size: int = Field(default=64, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    max_k: int = Field(
        default=10_000,
        ge=1,
        description="k and /knn-service's num_result_ids (clip-front asks for 3,000, and 10,000 "
        "to download)",
    )
    colocate: bool = Field(
        default=False,
        description="encode and search inside the ingress replica: no hops between deployments "
        "(the fastest layout when the model and the index fit one replica; needs shard_groups 1)",
    )
    columns_to_return: list[str] = Field(
        default_factory=lambda: ["url", "image_path", "caption", "NSFW", "punsafe", "pwatermark"],
        description="/knn-service: the metadata columns each hit carries, where the index holds "
        "them (clip back's columns_to_return)",
    )
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    aesthetic_embeddings: Uri | None = Field(
        default=None,
        description="folder holding LAION's aesthetic rating0.npy .. rating9.npy for the app's "
        "model "
        "(github.com/LAION-AI/aesthetic-predictor, vit_b_32_embeddings / vit_l_14_embeddings); "
        "None: aesthetic_score with a non-zero aesthetic_weight is refused (422)",
    )
    near_duplicate_threshold: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="deduplicate=true drops a hit whose vector has cosine >= this with a "
        "better hit (or the same URL)",
    )
    max_queries: int = Field(default=64, ge=1, description="queries per request")
    max_request_bytes: int = Field(default=16 * 2**20, ge=1)
    max_image_pixels: MaxImagePixels = MAX_IMAGE_PIXELS
    image_url_timeout_s: float = Field(
        default=3.0, gt=0, description="per connect / read of an image_url"
    )
    image_url_deadline_s: float = Field(
        default=5.0, gt=0, description="a whole image_url fetch, redirects included"
    )
    image_url_max_bytes: int = Field(default=10 * 2**20, ge=1)
    image_url_allowed_networks: list[Network] = Field(
        default_factory=list,
        description="non-public networks (CIDR) an image_url may reach, e.g. an internal "
        "mirror's; by default none: a client cannot make the server reach inside",
    )
    max_text_chars: int = Field(
        default=1000, ge=1, description="a text query (CLIP reads 77 tokens)"
    )
    max_dedup_hits: int = Field(
        default=30_000,
        ge=1,
        description="deduplicate=true: k x queries at most (each "
        "candidate travels with its vector)",
    )
    request_timeout_s: float = Field(default=10.0, gt=0)
    access: AccessConfig = Field(default_factory=AccessConfig)
    replica: Resources = Field(
        default_factory=Resources, description="each replica (serve_config.yaml overrides)"
    )
    reload_interval_s: float | None = Field(
        default=60,
        gt=0,
        description="each shard group checks its manifests this often and swaps in a new version "
        "(react-ray index --append); None: only on POST /admin/reload",
    )

    @model_validator(mode="after")
    def _colocate_one_group(self) -> RetrievalAppConfig:
        if self.colocate and self.shard_groups != 1:
            raise ValueError(
                f"colocate: the ingress holds the whole index, so shard_groups must be 1 "
                f"(got {self.shard_groups})"
            )
        return self


class ZeroShotAppConfig(StrictModel):
    models: dict[str, ModelConfig] = Field(
        min_length=1, description="model id -> model (base, react-..., ...)"
    )
    default_model: str | None = None
    tasks: dict[str, Uri] = Field(default_factory=dict, description="task name -> task spec YAML")
    max_cached_classifiers: int = Field(default=64, ge=1)
    max_images: int = Field(default=64, ge=1)
    max_classes: int = Field(default=2000, ge=1)
    max_templates: int = Field(default=100, ge=1)
    max_text_chars: int = Field(default=300, ge=1, description="a class name or a template")
    max_request_bytes: int = Field(default=32 * 2**20, ge=1)
    max_image_pixels: MaxImagePixels = MAX_IMAGE_PIXELS
    request_timeout_s: float = Field(default=20.0, gt=0)
    access: AccessConfig = Field(default_factory=AccessConfig)
    replica: Resources = Field(
        default_factory=Resources, description="each replica (serve_config.yaml overrides)"
    )


class ServeConfig(StrictModel):
    """``react-ray serve``: either or both apps on one local Serve instance."""

    retrieval: RetrievalAppConfig | None = None
    zeroshot: ZeroShotAppConfig | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    ingress: Literal["proxy", "direct", "haproxy"] = Field(
        default="proxy",
        description="how HTTP reaches the apps on the local Ray this command starts: Serve's "
        "proxy actor; direct (RAY_SERVE_ENABLE_DIRECT_INGRESS: the ingress replica listens "
        "itself); haproxy (RAY_SERVE_ENABLE_HA_PROXY: the bundled HAProxy in front of the "
        "replicas; fastest here, docs/performance.md; its stats and metrics ports 8404 and 9101 "
        "listen on all interfaces). On a cluster, set these variables in its environment",
    )
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _one_app(self) -> ServeConfig:
        if self.retrieval is None and self.zeroshot is None:
            raise ValueError("configure at least one app: retrieval and/or zeroshot")
        if self.ingress != "proxy" and self.ray_address not in (None, "local"):
            raise ValueError(
                f"ingress {self.ingress!r} is chosen when Ray starts: set "
                f"{INGRESS_ENV[self.ingress]}=1 in the cluster's environment instead (a "
                "RayService's env, docs/operations.md)"
            )
        return self


# What ServeConfig.ingress sets before a local Ray starts (Ray Serve reads them at start).
INGRESS_ENV = {
    "direct": "RAY_SERVE_ENABLE_DIRECT_INGRESS",
    "haproxy": "RAY_SERVE_ENABLE_HA_PROXY",
}


C = TypeVar("C", bound=StrictModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"corpus.num_shards=8"`` -> (["corpus", "num_shards"], 8); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        # a cross-field rule: its message says it all
        if not item["loc"] or item["type"] == "value_error":
            prefix = f"{field}: " if item["loc"] else ""
            lines.append(prefix + item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown field (check the spelling against the preset)")
        elif item["type"] == "missing":
            lines.append(f"{field}: required field is missing")
        else:
            lines.append(f"{field}: got {item.get('input')!r}; {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(config_type: type[C], data: dict) -> C:
    try:
        return config_type.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(config_type: type[C], path: str | None, overrides: list[str] = ()) -> C:
    """Read a YAML preset (or start from defaults when ``path`` is None), apply overrides,
    validate."""
    data: dict = {}
    if path:
        from react_ray.formats.storage import read_bytes

        loaded = yaml.safe_load(read_bytes(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level, got {type(loaded).__name__}"
            )
        data = loaded or {}
    return build_config(config_type, apply_overrides(data, list(overrides)))


def dump_config(config: StrictModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

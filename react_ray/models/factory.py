"""Build any OpenCLIP model by name, optionally with REACT gated blocks and a REACT checkpoint.

>>> clip = build_model(ModelConfig(name="react-tiny"))
>>> clip.encode_texts(["a red circle"]).shape
torch.Size([1, 128])
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn

from react_ray.fields import is_weights_path
from react_ray.formats import storage
from react_ray.models.config import ModelConfig
from react_ray.models.gated import default_gated_layers, insert_gated_blocks
from react_ray.models.releases import HUB_REPO, WEIGHTS_ENV

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
RANDOM_INIT_SEED = 0
_GATED_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.gated_attn_block\.")


@cache
def register_tiny_models() -> None:
    """Make the repo's small test/demo configs (``react-tiny``, ``react-micro``) known to
    open_clip."""
    open_clip.add_model_config(CONFIG_DIR)


def open_clip_config(name: str) -> dict:
    """OpenCLIP's config of a model name (the repo's tiny ones included); unknown names are refused
    with the closest known ones."""
    register_tiny_models()
    _check_model_name(name)
    return open_clip.get_model_config(name)


def embed_dim(name: str) -> int:
    return int(open_clip_config(name)["embed_dim"])


def image_size(name: str) -> int:
    """The side of the square images the model's tower takes."""
    size = open_clip_config(name)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """Mixed precision for fp16 / bf16 (AMP); fp32 runs as is."""
    dtype = AMP_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@cache
def get_tokenizer(name: str) -> Callable:
    """The model's tokenizer, once per process (CPU tasks tokenize captions before the model
    actor)."""
    register_tiny_models()
    with open_clip_quiet():
        return open_clip.get_tokenizer(name)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def open_clip_quiet(random_weights_expected: bool = False) -> Iterator[None]:
    """open_clip narrates each build at INFO on the root logger (Ray workers show INFO) and warns of
    random weights also when they are the point (tiny test models) or a checkpoint replaces them."""
    root = logging.getLogger()
    level, drop = root.level, _DropMessage("No pretrained weights loaded")
    root.setLevel(max(level, logging.WARNING))
    if random_weights_expected:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeFilter(drop)


def available_models() -> list[str]:
    register_tiny_models()
    return open_clip.list_models()


@dataclass
class ClipModel:
    """An OpenCLIP model with its tokenizer and image transforms, ready to embed."""

    model: nn.Module
    tokenizer: Callable
    preprocess: Callable  # eval transform: PIL image -> normalised tensor (image_preprocess(spec))
    spec: ModelConfig
    gated_indices: list[int] = field(default_factory=list)
    preprocess_cfg: PreprocessCfg = field(default_factory=PreprocessCfg)

    @property
    def decode_args(self) -> dict:
        """``decode_image``'s size, resize mode and interpolation for this model's weights."""
        return {
            "size": self.image_size,
            "resize_mode": self.preprocess_cfg.resize_mode,
            "interpolation": self.preprocess_cfg.interpolation,
        }

    @property
    def embed_dim(self) -> int:
        return embed_dim(self.spec.name)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed image batch (N, 3, H, W) -> L2-normalised features (N, D), float32."""
        features = self.model.encode_image(images.to(self.device), normalize=True)
        return features.float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions or prompts -> L2-normalised features (N, D), float32."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()


def _check_model_name(name: str) -> None:
    names = available_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"model.name: unknown model {name!r}.{hint} Run `react-ray models` for all "
            f"{len(names)} OpenCLIP names; the repo's small configs are {', '.join(TINY_MODELS)}."
        )


def _local_weights(uri: str) -> str:
    """A local path for a weights file given as a local path, ``file://`` or ``s3://`` URI."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"weights file not found: {uri}")
    return storage.local_copy(uri)


def _check_release_copy(spec: ModelConfig) -> None:
    if spec.release and spec.checkpoint and not storage.exists(spec.checkpoint):
        file = spec.checkpoint.rsplit("/", 1)[-1]
        raise FileNotFoundError(
            f"model: REACT's {spec.release} is read from {spec.checkpoint}, "
            f"which does not exist; fetch {HUB_REPO}/{file} from the Hugging "
            f"Face hub there (or set {WEIGHTS_ENV} to the folder holding it)"
        )


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    if not pretrained:
        return None
    if is_weights_path(pretrained):
        return _local_weights(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        allowed = ", ".join(tags) if tags else "none (use a weights file path)"
        raise ValueError(
            f"model.pretrained: {pretrained!r} is not a tag of {name}; its tags are: {allowed}"
        )
    if open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu") and not name.endswith(
        "-quickgelu"
    ):
        # open_clip only warns and builds GELU: every activation of the tower would differ from
        # training.
        raise ValueError(
            f"model.name: the {pretrained!r} weights of {name} were trained with QuickGELU; use "
            f"name: {name}-quickgelu (REACT's react_{name}-quickgelu starts from it)"
        )
    return pretrained


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A REACT-format checkpoint: a bare (fp16) state_dict, keys optionally prefixed ``module.``;
    open_clip training checkpoints (``{"state_dict": ...}``) are accepted too."""
    state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def gated_layers_in(state: dict[str, torch.Tensor]) -> int:
    return len({int(m.group(1)) for k in state if (m := _GATED_KEY.match(k))})


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))


def recorded_preprocess_uri(checkpoint: str) -> str:
    """Where a checkpoint written here records its model's image preprocessing
    (``model.pt.json``)."""
    return checkpoint + ".json"


def image_preprocess(spec: ModelConfig) -> PreprocessCfg:
    """Size, mean, std, interpolation and resize mode of ``spec``'s images: the one source for
    embedding, training, evaluation and serving. The model config's, overlaid by its pretrained
    tag's (or ``base_tag``'s), overlaid by what the checkpoint recorded when it was written."""
    config = open_clip_config(spec.name)
    size = config["vision_cfg"]["image_size"]
    merged = merge_preprocess_dict(PreprocessCfg(size=size), config.get("preprocess_cfg", {}))
    tag = (
        spec.pretrained
        if spec.pretrained and not is_weights_path(spec.pretrained)
        else spec.base_tag
    )
    if tag:
        merged = merge_preprocess_dict(merged, open_clip.get_pretrained_cfg(spec.name, tag))
    if spec.checkpoint and storage.exists(recorded_preprocess_uri(spec.checkpoint)):
        recorded = json.loads(storage.read_bytes(recorded_preprocess_uri(spec.checkpoint)))
        merged = merge_preprocess_dict(merged, recorded.get("preprocess", {}))
    return PreprocessCfg(**merged)


def eval_transform(spec: ModelConfig) -> Callable:
    """PIL image -> normalised tensor, as the weights expect (open_clip's eval transform)."""
    return image_transform_v2(image_preprocess(spec), is_train=False)


def build_model(spec: ModelConfig | str, device: str | torch.device = "cpu") -> ClipModel:
    """Create the model ``spec`` names; insert gated blocks when asked or when the checkpoint has
    them.

    ``spec.gated_layers``: None means "REACT's K if the checkpoint is gated, else none";
    0 means none; K>0 inserts K blocks. A checkpoint is loaded with strict key checking: a gated
    checkpoint into the gated model, a base checkpoint into the base before fresh blocks go in.
    """
    spec = ModelConfig(name=spec) if isinstance(spec, str) else spec
    _check_model_name(spec.name)
    _check_release_copy(spec)
    pretrained = _resolve_pretrained(spec.name, spec.pretrained)
    state = read_state_dict(spec.checkpoint) if spec.checkpoint else None
    num_gated = spec.gated_layers
    if num_gated is None:
        num_gated = gated_layers_in(state) if state is not None else 0
    # A fixed seed: every actor of a pool, every process, builds the same random-weight model
    # (and the same fresh gated blocks), without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            # Random weights are the point of the tiny models, and a checkpoint replaces them.
            random_expected = pretrained is None and (state is not None or spec.name in TINY_MODELS)
            with open_clip_quiet(random_weights_expected=random_expected):
                model = open_clip.create_model(spec.name, pretrained=pretrained, device=device)
        except RuntimeError as error:
            raise RuntimeError(
                f"could not load pretrained weights {spec.pretrained!r} "
                f"for {spec.name}: {error}. Without network access, download "
                "the weights once and pass their path or s3:// URI."
            ) from error
        if state is not None and num_gated and not gated_layers_in(state):
            # A base checkpoint under fresh gated blocks: REACT's starting point.
            load_state_dict_strict(model, state, spec.checkpoint)
            state = None
        gated_indices = insert_gated_blocks(model, num_gated) if num_gated else []
    if state is not None:
        load_state_dict_strict(model, state, spec.checkpoint)
    model.eval()
    preprocess = image_preprocess(spec)
    # what the embedder normalises with
    open_clip.set_model_preprocess_cfg(model, asdict(preprocess))
    return ClipModel(
        model=model,
        tokenizer=get_tokenizer(spec.name),
        preprocess=image_transform_v2(preprocess, is_train=False),
        preprocess_cfg=preprocess,
        spec=spec,
        gated_indices=gated_indices,
    )


def react_gated_layers(name: str) -> int:
    """REACT's K for a model name (6 for ViT-B/L, 12 for bigG, half the depth otherwise)."""
    config = open_clip_config(name)
    return default_gated_layers(name, int(config["vision_cfg"]["layers"]))


def export_react_checkpoint(model: nn.Module, uri: str, spec: ModelConfig) -> None:
    """Write the whole model as REACT releases it, a bare fp16 state_dict (``torch.save``), and
    beside it (``model.pt.json``) the model name and image preprocessing it was trained with."""
    state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    record = {
        "model": spec.name,
        "gated_layers": gated_layers_in(state),
        "preprocess": asdict(image_preprocess(spec)),
    }
    storage.write_text_atomic(recorded_preprocess_uri(uri), json.dumps(record, indent=1))


__all__ = [
    "TINY_MODELS",
    "ClipModel",
    "available_models",
    "build_model",
    "eval_transform",
    "export_react_checkpoint",
    "image_preprocess",
    "react_gated_layers",
    "read_state_dict",
]

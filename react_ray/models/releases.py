"""REACT's released ImageNet-1K checkpoints, named as REACT names them, loaded from a local copy.

REACT's open_clip fork registers them as pretrained tags (``--model react_ViT-L-14 --pretrained
react_clip_ret_laion400m``), files of the Hugging Face repository ``react-vl/react-in1k``. Here the
same pair of names, in a ``model:`` entry, becomes the OpenCLIP model that fits the weights:

- the architecture with QuickGELU when the base was (OpenAI's CLIP, OpenCLIP's LAION-400M B/32),
  which REACT's GELU ``react_ViT-B-32`` config does not say (its README trains
  ``react_ViT-B-32-quickgelu``, also accepted here);
- REACT's K gated blocks for ``react_*`` names (gated-image), none for the plain names
  (locked-text checkpoints: the whole image tower tuned);
- the base tag, whose image statistics apply (OpenCLIP's LAION-2B L/14 normalises with 0.5).

No network here: the file is read from ``$REACT_RAY_WEIGHTS`` (default
``~/.cache/react-ray/weights``, a local folder or ``s3://`` prefix) under its hub file name.
Pure data: no torch, so configs can resolve names cheaply.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

HUB_REPO = "react-vl/react-in1k"
WEIGHTS_ENV = "REACT_RAY_WEIGHTS"
# REACT's K per architecture (its react_cfg.last_k_layers).
REACT_GATED_LAYERS = {"ViT-B-32": 6, "ViT-B-16": 6, "ViT-L-14": 6, "ViT-bigG-14": 12}

# (model name, tag) -> file in react-vl/react-in1k, as REACT's pretrained.py lists them.
RELEASED_FILES = {
    ("react_ViT-B-32", "react_clip_ret_laion400m"): "clip-vit-base-32-gated-image.pt",
    (
        "react_ViT-B-32",
        "react_openclip_laion400m_ret_laion400m",
    ): "openclip-vit-base-32-gated-image.pt",
    (
        "react_ViT-B-32",
        "react_openclip_laion2b_ret_laion400m",
    ): "openclip-laion2b-vit-base-32-gated-image.pt",
    ("ViT-B-32", "react_clip_ret_laion400m"): "clip-vit-base-32-locked-text.pt",
    ("ViT-B-32", "react_openclip_laion400m_ret_laion400m"): "openclip-vit-base-32-locked-text.pt",
    (
        "ViT-B-32",
        "react_openclip_laion2b_ret_laion400m",
    ): "openclip-laion2b-vit-base-32-locked-text.pt",
    ("react_ViT-B-16", "react_clip_ret_laion400m"): "clip-vit-base-16-gated-image.pt",
    ("ViT-B-16", "react_clip_ret_laion400m"): "clip-vit-base-16-locked-text.pt",
    ("react_ViT-L-14", "react_clip_ret_laion400m"): "clip-vit-large-14-gated-image.pt",
    ("react_ViT-L-14", "react_clip_ret_laion2b"): "clip-vit-large-14-gated-image-laion2b.pt",
    (
        "react_ViT-L-14",
        "react_openclip_laion2b_ret_laion400m",
    ): "openclip-vit-large-14-gated-image.pt",
    (
        "react_ViT-L-14",
        "react_openclip_laion2b_ret_laion2b",
    ): "openclip-vit-large-14-gated-image-laion2b.pt",
    (
        "react_ViT-bigG-14",
        "react_openclip_laion2b_ret_laion2b",
    ): "openclip-vit-bigG-14-gated-image-laion2b.pt",
}
# The base each tag starts from, per architecture, as an OpenCLIP pretrained tag.
BASE_TAGS = {
    "clip": {"ViT-B-32": "openai", "ViT-B-16": "openai", "ViT-L-14": "openai"},
    "openclip_laion400m": {"ViT-B-32": "laion400m_e32"},
    "openclip_laion2b": {
        "ViT-B-32": "laion2b_s34b_b79k",
        "ViT-L-14": "laion2b_s32b_b82k",
        "ViT-bigG-14": "laion2b_s39b_b160k",
    },
}
QUICKGELU_BASES = {("clip", arch) for arch in BASE_TAGS["clip"]} | {
    ("openclip_laion400m", "ViT-B-32")
}
_TAG = re.compile(r"^react_(clip|openclip_laion400m|openclip_laion2b)_ret_(laion400m|laion2b)$")


@dataclass(frozen=True)
class Release:
    """One released checkpoint and the OpenCLIP model it loads into."""

    name: str  # as REACT names the model, e.g. react_ViT-B-32-quickgelu
    tag: str  # e.g. react_clip_ret_laion400m
    file: str  # in HUB_REPO
    open_clip_name: str  # e.g. ViT-B-32-quickgelu
    gated_layers: int  # REACT's K for gated-image checkpoints, 0 for locked-text ones
    base_tag: str  # the OpenCLIP tag of the base: its image statistics apply

    @property
    def label(self) -> str:
        return f"{self.name}:{self.tag}"

    def local_uri(self) -> str:
        folder = os.environ.get(WEIGHTS_ENV) or "~/.cache/react-ray/weights"
        return f"{folder.rstrip('/')}/{self.file}"


def is_release_name(name: str, pretrained: str | None) -> bool:
    return name.startswith("react_") or bool(pretrained and _TAG.match(pretrained))


def find_release(name: str, pretrained: str | None) -> Release:
    """The release ``name`` + ``pretrained`` names; ValueError listing the released pairs if
    none."""
    gated = name.startswith("react_")
    arch = name.removeprefix("react_").removesuffix("-quickgelu")
    listed = ("react_" + arch if gated else arch, pretrained)
    match = _TAG.match(pretrained or "")
    if listed not in RELEASED_FILES or not match:
        known = ", ".join(f"{n}:{t}" for n, t in RELEASED_FILES)
        raise ValueError(
            f"model: REACT released no {name}:{pretrained}; its checkpoints are {known} "
            "(react_ViT-B-32-quickgelu takes react_ViT-B-32's tags)"
        )
    base = match.group(1)
    quick = (base, arch) in QUICKGELU_BASES
    return Release(
        name=name,
        tag=pretrained,
        file=RELEASED_FILES[listed],
        open_clip_name=arch + ("-quickgelu" if quick else ""),
        gated_layers=REACT_GATED_LAYERS[arch] if gated else 0,
        base_tag=BASE_TAGS[base][arch],
    )

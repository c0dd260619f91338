"""REACT's gated-image blocks, added to an OpenCLIP image tower without copying open_clip.

A :class:`GatedResidualBlock` is attached as ``resblocks[i].gated_attn_block`` to each of
the last K residual blocks of the ViT and runs on the block's input before the block itself
(a forward pre-hook). The state_dict keys therefore match REACT's released checkpoints:
``visual.transformer.resblocks.{i}.gated_attn_block.{alpha_attn, ln_1.weight, ...}``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from react_ray.models.releases import REACT_GATED_LAYERS  # REACT's K; other ViTs: half their depth

# REACT's gated block never passes the tower's MLP ratio: 4.0 also on bigG (whose own blocks use
# 4.9231).
MLP_RATIO = 4.0


class GatedResidualBlock(nn.Module):
    """``x + tanh(a_attn) * MHSA(LN1(x))`` then ``x + tanh(a_dense) * MLP(LN2(x))``.

    Both gates start at 0, so a freshly inserted block is the identity and the model equals
    its base CLIP exactly until training moves the gates.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        batch_first: bool = True,
    ):
        super().__init__()
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))
        self.ln_1 = norm_layer(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_2 = norm_layer(width)
        hidden = int(width * MLP_RATIO)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", act_layer()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.grad_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + torch.tanh(self.alpha_attn) * self.attn(y, y, y, need_weights=False)[0]
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def _run_gated_block_first(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: feed the residual block the gated block's output instead of x."""
    if args:
        return (block.gated_attn_block(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "q_x": block.gated_attn_block(kwargs["q_x"])}


def image_resblocks(model: nn.Module) -> nn.ModuleList:
    visual = model.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise ValueError(
            f"REACT gated blocks need a ViT image tower; {type(visual).__name__} has no "
            "transformer.resblocks (ResNet / timm towers are not supported)"
        )
    return transformer.resblocks


def default_gated_layers(model_name: str, depth: int) -> int:
    """REACT's K; the ``-quickgelu`` variant of an architecture (OpenAI's weights) has the same
    K."""
    return REACT_GATED_LAYERS.get(model_name.removesuffix("-quickgelu"), max(1, depth // 2))


def insert_gated_blocks(model: nn.Module, num_layers: int) -> list[int]:
    """Attach a gated block before each of the last ``num_layers`` ViT blocks; return their indices.

    Norm and activation follow the base block (QuickGELU for OpenAI-CLIP bases), on the same
    device and dtype as the tower.
    """
    resblocks = image_resblocks(model)
    depth = len(resblocks)
    if not 0 < num_layers <= depth:
        raise ValueError(
            f"gated_layers: got {num_layers}; the image tower has {depth} blocks (1..{depth})"
        )
    indices = list(range(depth - num_layers, depth))
    for i in indices:
        block = resblocks[i]
        if hasattr(block, "gated_attn_block"):
            raise ValueError(f"image block {i} already has a gated block")
        reference = block.attn.in_proj_weight
        gated = GatedResidualBlock(
            width=block.attn.embed_dim,
            heads=block.attn.num_heads,
            norm_layer=type(block.ln_1),
            act_layer=type(block.mlp.gelu),
            batch_first=block.attn.batch_first,
        ).to(device=reference.device, dtype=reference.dtype)
        block.gated_attn_block = gated
        block.register_forward_pre_hook(_run_gated_block_first, with_kwargs=True)
    return indices


def gated_blocks(model: nn.Module) -> list[GatedResidualBlock]:
    return [m for m in model.modules() if isinstance(m, GatedResidualBlock)]


def set_gated_grad_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    for block in gated_blocks(model):
        block.grad_checkpointing = enabled


def gate_values(model: nn.Module) -> dict[str, float]:
    """tanh of every gate, keyed like ``block6.attn``: how far tuning has opened each block."""
    values = {}
    for name, module in model.named_modules():
        if isinstance(module, GatedResidualBlock):
            index = name.split(".")[-2]
            values[f"block{index}.attn"] = float(torch.tanh(module.alpha_attn.detach()))
            values[f"block{index}.dense"] = float(torch.tanh(module.alpha_dense.detach()))
    return values

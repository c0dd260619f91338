"""The symmetric CLIP contrastive loss over features gathered from every worker.

Each worker scores its own rows against the columns of the whole global batch
(``local_loss``): the all-gather carries gradients back to the rank that made each
feature, and DDP's gradient averaging then yields exactly the gradient of the mean
loss over the global batch, as one worker with the same global batch would compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def _gathered(features: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    if features.requires_grad:
        return torch.cat(all_gather(features))
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features)  # a frozen tower: no gradient to carry back
    return torch.cat(parts)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; features L2-normalised, scale = exp(t)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    all_images, all_texts = _gathered(image_features), _gathered(text_features)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank * n
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2

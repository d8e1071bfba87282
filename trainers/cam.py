"""Class activation maps, batched on the device, as the wsolevaluation protocol computes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize_cams(cams: Tensor) -> Tensor:
    """Min-max normalise each (H, W) map of a (B, H, W) batch to [0, 1]; constant or NaN maps become 0."""
    low = cams.amin(dim=(1, 2), keepdim=True)
    span = cams.amax(dim=(1, 2), keepdim=True) - low
    valid = torch.isfinite(span) & (span > 0)  # NaN anywhere makes the span NaN
    scaled = (cams - low) / torch.where(valid, span, torch.ones_like(span))
    return torch.where(valid, scaled.clamp_(0, 1), torch.zeros_like(cams))


def class_activation_maps(
    features: Tensor, classifier_weight: Tensor, targets: Tensor, size: tuple[int, int]
) -> Tensor:
    """(B, H, W) CAMs in [0, 1] of each image's target class, upsampled (bicubic) to `size`; no ReLU."""
    if features.ndim != 4:
        raise ValueError(f"features: shape {tuple(features.shape)} is not (B, C, h, w)")
    if targets.shape != (features.shape[0],):
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match {features.shape[0]} feature maps")
    if classifier_weight.ndim != 2 or classifier_weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"classifier_weight: shape {tuple(classifier_weight.shape)} does not match {features.shape[1]} channels"
        )
    weights = classifier_weight[targets].float()  # (B, C); the bias is constant per map and cancels
    cams = torch.einsum("bchw,bc->bhw", features.float(), weights)  # (B, h, w)
    cams = F.interpolate(cams[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]
    return normalize_cams(cams)


@torch.no_grad()
def predict_with_cams(model, images: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Logits and CAMs (of `targets`, or of the predicted class when None) at the input's size."""
    features = model.forward_features(images)
    logits = model.forward_head(features)
    chosen = logits.argmax(dim=1) if targets is None else targets
    cams = class_activation_maps(features, model.classifier.weight, chosen, tuple(images.shape[2:]))
    return logits, cams

"""Training losses that are pure functions of model outputs (no parameters of their own)."""

from mmjax.losses.contrastive import (
    sigmoid_contrastive_loss,
    sigmoid_contrastive_loss_reference,
    softmax_contrastive_loss,
    softmax_contrastive_loss_reference,
)

__all__ = [
    "sigmoid_contrastive_loss",
    "sigmoid_contrastive_loss_reference",
    "softmax_contrastive_loss",
    "softmax_contrastive_loss_reference",
]

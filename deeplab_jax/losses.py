"""Pixel-wise softmax cross-entropy as the official DeepLab trains it (SPEC section 8).

Ignored pixels (label 255) carry weight 0; optional per-class weights; optional hard-pixel mining that
keeps the top k% pixel losses of the global batch, ramping from 100% to k% over a number of steps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from deeplab_jax import metrics
from deeplab_jax.models import upsample_logits


def pixel_losses(logits, labels, *, ignore_label: int = 255,
                 class_weights: Optional[Sequence[float]] = None):
  """Per-pixel weighted cross-entropy and weights, in float32, logits upsampled to the label size.

  logits: (N, h, w, C) at any resolution; labels: (N, H, W) or (N, H, W, 1) integers.
  Returns (losses, weights), both (N, H, W); weights are 0 on ignored pixels.
  """
  if labels.ndim == 4:
    labels = labels[..., 0]
  labels = labels.astype(jnp.int32)
  num_classes = logits.shape[-1]
  logits = upsample_logits(logits, labels.shape[1:3])
  valid = metrics.valid_pixels(labels, num_classes, ignore_label)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return nll * weights, weights


def hard_pixel_fraction(step, top_k_percent: float, ramp_steps: int):
  """Fraction of pixels kept: 1 at step 0, falling linearly to top_k_percent / 100 at `ramp_steps`."""
  k = top_k_percent / 100.0
  if ramp_steps <= 0:
    return jnp.float32(k)
  ratio = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / ramp_steps)
  return ratio * k + (1.0 - ratio)


def segmentation_loss(logits, labels, *, step=0, ignore_label: int = 255,
                      class_weights: Optional[Sequence[float]] = None,
                      top_k_percent: float = 100.0, hard_mining_steps: int = 0):
  """Mean weighted cross-entropy over the pixels that count; a scalar float32.

  With top_k_percent < 100 only the largest pixel losses of the whole batch count, their number set by
  `hard_pixel_fraction` (a traced step works: the cut is a mask over sorted losses, not a dynamic shape).
  """
  losses, weights = pixel_losses(logits, labels, ignore_label=ignore_label,
                                 class_weights=class_weights)
  if top_k_percent >= 100.0:
    return jnp.sum(losses) / jnp.maximum(jnp.sum((weights > 0).astype(jnp.float32)), 1.0)
  flat = losses.reshape(-1)
  fraction = hard_pixel_fraction(step, top_k_percent, hard_mining_steps)
  k = (fraction * flat.shape[0]).astype(jnp.int32)
  top = -jnp.sort(-flat)  # descending
  keep = jnp.arange(flat.shape[0]) < k
  kept = jnp.where(keep, top, 0.0)
  # As the official code: the mean over kept pixels whose loss is non-zero (ignored pixels are 0).
  count = jnp.sum((keep & (top != 0)).astype(jnp.float32))
  return jnp.sum(kept) / jnp.maximum(count, 1.0)

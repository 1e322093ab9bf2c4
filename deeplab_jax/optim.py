"""SGD with momentum, the "poly" learning rate and DeepLab's weight decay (SPEC section 8).

Adam (decoupled weight decay, AdamW) is the one alternative: the SPEC's SGD recipe is for fine-tuning
from ImageNet weights, and a from-scratch run such as the embedded default learns faster with Adam
(configs/shapes.py has the measurements).
"""
from __future__ import annotations

from typing import Optional

import jax
import optax

from deeplab_jax.config import OPTIMIZERS


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0,
                  end_lr: float = 0.0) -> optax.Schedule:
  """base_lr * (1 - step / total)^power down to end_lr, after an optional linear warm-up from 0.

  With warm-up the poly part spans the remaining steps, so the rate still reaches end_lr at the end.
  """
  if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
  poly = optax.polynomial_schedule(base_lr, end_lr, power, total_steps - warmup_steps)
  if warmup_steps == 0:
    return poly
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, poly], [warmup_steps])


def weight_decay_mask(params):
  """True on regular conv kernels (4-D, logits included); False on BN, biases and depthwise kernels.

  The official code regularizes conv weights only and leaves depthwise weights alone
  (`regularize_depthwise=False`).
  """
  def is_decayed(path, leaf):
    keys = [getattr(k, "key", str(k)) for k in path]
    return keys[-1] == "kernel" and leaf.ndim == 4 and "depthwise" not in keys
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(learning_rate: optax.ScalarOrSchedule, *, name: str = "sgd",
                     momentum: float = 0.9, weight_decay: float = 0.0,
                     grad_clip_norm: Optional[float] = None,
                     nesterov: bool = False) -> optax.GradientTransformation:
  """[clip] -> the update direction -> weight decay on masked kernels -> learning rate.

  "sgd": + weight_decay * w before SGD momentum (= L2 wd * |w|^2 / 2 in the loss, as the official
  code). "adam": Adam with `momentum` as beta1, then weight_decay * w added to Adam's direction
  (decoupled, AdamW: an L2 term would be rescaled by Adam's per-parameter denominators).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")
  parts = []
  if grad_clip_norm:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == "sgd":
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
  else:
    parts.append(optax.scale_by_adam(b1=momentum))
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)

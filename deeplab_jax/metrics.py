"""Segmentation metrics as summed confusion matrices (rows: ground truth, columns: prediction).

Batches are padded to a fixed shape; a mask removes padded examples and pixels so that every real pixel
counts exactly once. Pixels labelled `ignore_label` never count.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def valid_pixels(labels, num_classes: int, ignore_label: int = 255):
  """Pixels that count: a real class, not `ignore_label` (the loss and the metrics share this rule)."""
  return (labels != ignore_label) & (labels >= 0) & (labels < num_classes)


def confusion_matrix(labels, predictions, num_classes: int, mask=None, ignore_label: int = 255):
  """(num_classes, num_classes) int32 counts for one batch; jit-friendly (a bincount)."""
  if labels.ndim == predictions.ndim + 1:
    labels = labels[..., 0]
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  valid = valid_pixels(labels, num_classes, ignore_label)
  if mask is not None:
    valid = valid & jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim)),
                                     labels.shape).astype(bool)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix_numpy(labels, predictions, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """`confusion_matrix` on the host, int64, for images of any size (no compilation per size): the
  images that training's evaluation assembles from sliding windows, and `evaluate`'s."""
  labels = np.asarray(labels).astype(np.int64)
  valid = valid_pixels(labels, num_classes, ignore_label)
  index = labels[valid] * num_classes + np.asarray(predictions)[valid].astype(np.int64)
  return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm) -> dict:
  """mean IoU (over classes present in ground truth or prediction), per-class IoU, pixel accuracy.

  A class with an empty union has IoU NaN and is left out of the mean, as TF's mean_iou does.
  """
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  total = cm.sum()
  return {
      "mean_iou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
      "per_class_iou": [float(x) for x in iou],
      "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
  }

"""Label maps to colors for summaries and overlays."""
from __future__ import annotations

import numpy as np


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """The PASCAL VOC color map: bits of the class index spread over R, G and B, high bits first."""
  palette = np.zeros((num_colors, 3), np.uint8)
  for index in range(num_colors):
    c, r, g, b = index, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= (c & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[index] = (r, g, b)
  return palette


def colorize(labels, palette: np.ndarray | None = None) -> np.ndarray:
  """(..., H, W) integer labels -> (..., H, W, 3) uint8; 255 (ignore) gets the palette's last color."""
  palette = voc_palette() if palette is None else palette
  labels = np.asarray(labels)
  return palette[np.clip(labels, 0, len(palette) - 1).astype(np.int64)]


def crop_to_labeled(row: np.ndarray, label: np.ndarray, ignore_label: int) -> np.ndarray:
  """Cut a padded eval panel row (H, k*W, 3) back to its image (padding is bottom/right and ignored).

  For pictures only: a border that is all ignored in the truth is cut as well.
  """
  rows, cols = np.nonzero(np.asarray(label) != ignore_label)
  if not len(rows):
    return row
  width = label.shape[1]
  h, w = rows.max() + 1, cols.max() + 1
  return np.concatenate([row[:h, k * width:k * width + w] for k in range(row.shape[1] // width)], 1)


def stack(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
  """Panels of varied sizes, top to bottom on white, `gap` pixels apart."""
  height = sum(p.shape[0] for p in panels) + gap * (len(panels) - 1)
  out = np.full((height, max(p.shape[1] for p in panels), 3), 255, np.uint8)
  top = 0
  for panel in panels:
    out[top:top + panel.shape[0], :panel.shape[1]] = panel
    top += panel.shape[0] + gap
  return out

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

"""The sliding window over images larger than the network's input: where the windows go and how
their logits combine. `infer.Predictor` and training's evaluation (`train.Evaluator`) both tile with
this, so an image is cut the same way whichever of them evaluates it.

The layout is mmsegmentation's "slide" mode: windows start every `stride` pixels from the top-left,
the last one in each direction moved back to end at the image's edge, and overlapping logits are
averaged (logits, not probabilities, as slide mode does). An image no larger than the window in a
direction gets one window there, padded bottom/right with the mean pixel as whole images are. A
window of 512 with a third of overlap gives slide mode's usual stride of 341.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_OVERLAP = 1 / 3


def stride(window: Sequence[int], overlap: float) -> tuple[int, int]:
  """The step between neighbouring windows: `overlap` of each window is shared with the next."""
  if not 0 <= overlap < 1:
    raise ValueError(f"overlap={overlap} must be in [0, 1)")
  return tuple(max(1, int(w * (1 - overlap))) for w in window)


def starts(dim: int, window: int, step: int) -> list[int]:
  """Window offsets along one side of length `dim`: 0, step, 2 step, ..., and dim - window last."""
  if dim <= window:
    return [0]
  return list(range(0, dim - window, step)) + [dim - window]


def tiles(height: int, width: int, window: Sequence[int], step: Sequence[int]
          ) -> list[tuple[int, int, int, int]]:
  """(top, left, tile height, tile width) of every window over a (height, width) image, row by row.
  A tile is the window, or the whole side where the image is smaller than the window."""
  return [(top, left, min(window[0], height), min(window[1], width))
          for top in starts(height, window[0], step[0])
          for left in starts(width, window[1], step[1])]


class Average:
  """The mean of the logits of every window that covers each pixel of a (height, width) image."""

  def __init__(self, height: int, width: int, num_classes: int):
    self.total = np.zeros((height, width, num_classes), np.float32)
    self.count = np.zeros((height, width, 1), np.float32)

  def add(self, top: int, left: int, logits: np.ndarray) -> None:
    """`logits` (h, w, C) of the tile at (top, left)."""
    h, w = logits.shape[:2]
    self.total[top:top + h, left:left + w] += logits
    self.count[top:top + h, left:left + w] += 1

  def result(self) -> np.ndarray:
    return self.total / self.count

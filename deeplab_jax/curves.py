"""A run's learning curves as a PNG in its workdir, read back from its TensorBoard events.

Reading the events (not a history kept in memory) makes the plot whole after a resume: a step that
was logged twice, before an interruption and after the restart, keeps its last value. Drawn with
Pillow, which the input pipeline needs anyway, so that no plotting library is a dependency.
"""
from __future__ import annotations

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LOSS_TAG, IOU_TAG = "train/loss", "eval/mean_iou"
PLOT_NAME = "curves.png"
_SIZE, _MARGIN = (420, 300), (58, 22, 18, 42)  # panel size; left, top, right, bottom margins
_COLORS = ((31, 119, 180), (214, 39, 40))


def read_scalars(workdir, tags=(LOSS_TAG, IOU_TAG)) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} sorted by step, the last write of each step winning."""
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  values = {tag: {} for tag in tags}
  for path in sorted(epath.Path(workdir).glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag in values:
          scalar = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
          values[value.tag][int(event.step)] = float(np.asarray(scalar).reshape(()))
  return {tag: sorted(points.items()) for tag, points in values.items()}


def _ticks(low: float, high: float, count: int = 5) -> np.ndarray:
  """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
  span = max(high - low, 1e-12)
  raw = span / count
  step = min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10)),
             key=lambda s: abs(span / s - count))
  return np.arange(np.ceil(low / step) * step, high + step * 1e-6, step)


def _panel(points, title: str, y_range, color, steps_max: int, font) -> Image.Image:
  panel = Image.new("RGB", _SIZE, "white")
  draw = ImageDraw.Draw(panel)
  left, top, right, bottom = _MARGIN
  x0, y0, x1, y1 = left, top, _SIZE[0] - right, _SIZE[1] - bottom
  lo, hi = y_range
  to_xy = lambda s, v: (x0 + (x1 - x0) * s / steps_max, y1 - (y1 - y0) * (v - lo) / (hi - lo))
  for tick in _ticks(lo, hi):
    _, y = to_xy(0, tick)
    draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
    draw.text((x0 - 6, y), f"{tick:g}", fill="black", font=font, anchor="rm")
  for tick in _ticks(0, steps_max):
    x, _ = to_xy(tick, lo)
    draw.line([(x, y1), (x, y1 + 4)], fill="black")
    draw.text((x, y1 + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
  draw.rectangle([x0, y0, x1, y1], outline="black")
  draw.text(((x0 + x1) / 2, _SIZE[1] - 4), "step", fill="black", font=font, anchor="mb")
  draw.text(((x0 + x1) / 2, 4), title, fill="black", font=font, anchor="mt")
  xy = [to_xy(s, min(max(v, lo), hi)) for s, v in points]
  if len(xy) > 1:
    draw.line(xy, fill=color, width=2)
  for x, y in xy if len(xy) < 40 else xy[-1:]:
    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
  return panel


def plot(scalars: dict, steps_max: int) -> Image.Image:
  """Train loss | eval mean IoU side by side, over steps 0..steps_max."""
  font = ImageFont.load_default(size=13)
  loss, iou = scalars.get(LOSS_TAG, []), scalars.get(IOU_TAG, [])
  loss_max = max([v for _, v in loss if np.isfinite(v)] or [1.0])
  last_iou = f" (last {iou[-1][1]:.3f})" if iou else ""
  panels = [_panel(loss, "train loss", (0.0, loss_max * 1.05), _COLORS[0], steps_max, font),
            _panel(iou, f"eval mean IoU{last_iou}", (0.0, 1.0), _COLORS[1], steps_max, font)]
  image = Image.new("RGB", (_SIZE[0] * 2, _SIZE[1]), "white")
  for k, panel in enumerate(panels):
    image.paste(panel, (k * _SIZE[0], 0))
  return image


def write(workdir, steps_max: int) -> epath.Path:
  """Plot the workdir's curves into WORKDIR/curves.png; returns its path."""
  workdir = epath.Path(workdir)
  path = workdir / PLOT_NAME
  with path.open("wb") as f:
    plot(read_scalars(workdir), steps_max).save(f, format="PNG")
  return path

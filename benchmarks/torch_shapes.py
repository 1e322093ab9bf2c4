"""Cross-check of the embedded default's training: the same data and recipe in PyTorch on the CPU.

  pip install torch torchvision  # CPU wheels; not in requirements.txt
  python benchmarks/torch_shapes.py --steps=3000 --eval_every=500

A comparable network, not the same one: torchvision's MobileNetV2 (width 0.5, dilated to output
stride 16) under a DeepLabv3+ head written here like ours (separable ASPP at rates 6/12/18 with image
pooling, dropout 0.1, 48-channel low-level projection, two separable 3x3 decoder convs). The data
are `deeplab_jax.datasets.shapes`' generator with its seeds (train 0, val 1), augmented as the
SPEC's procedure (scales 0.75/1.0/1.25, pad with the mean and the ignore label, crop, flip); the
optimizer is configs/shapes.py's (read from it, so the two cannot drift). Prints one JSON line per
evaluation (step, training seconds, loss, mean and per-class IoU on the whole val images) to compare
with the JAX run's curve. TensorFlow is never imported: torch and TensorFlow in one process crash.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import shapes as shapes_config  # noqa: E402
from deeplab_jax.datasets import shapes  # noqa: E402

IGNORE = 255


def separable(cin, cout, rate=1):
  return nn.Sequential(
      nn.Conv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False),
      nn.BatchNorm2d(cin, eps=1e-5), nn.ReLU(),
      nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-5), nn.ReLU())


def conv_bn(cin, cout):
  return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-5), nn.ReLU())


class DeepLab(nn.Module):
  def __init__(self, num_classes, width=0.5, rates=(6, 12, 18)):
    super().__init__()
    features = torchvision.models.mobilenet_v2(width_mult=width).features[:-1]  # drop the 1280 conv
    # Output stride 16: the last strided unit (index 14) keeps stride 1, later depthwise convs dilate 2.
    for index in range(14, len(features)):
      for module in features[index].modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:
          module.stride, module.dilation, module.padding = (1, 1), (2, 2), (2, 2)
    self.low, self.high = features[:4], features[4:]
    low_ch, high_ch = features[3].out_channels, features[-1].out_channels
    self.aspp = nn.ModuleList([conv_bn(high_ch, 256)] + [separable(high_ch, 256, r) for r in rates])
    self.pool = conv_bn(high_ch, 256)
    self.project = nn.Sequential(conv_bn(256 * (len(rates) + 2), 256), nn.Dropout(0.1))
    self.low_project = conv_bn(low_ch, 48)
    self.decoder = nn.Sequential(separable(256 + 48, 256), separable(256, 256))
    self.logits = nn.Conv2d(256, num_classes, 1)

  def forward(self, x):
    size = x.shape[-2:]
    low = self.low(x)
    high = self.high(low)
    pooled = self.pool(high.mean((2, 3), keepdim=True)).expand(-1, -1, *high.shape[-2:])
    y = self.project(torch.cat([pooled] + [branch(high) for branch in self.aspp], 1))
    y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=True)
    y = self.decoder(torch.cat([y, self.low_project(low)], 1))
    return F.interpolate(self.logits(y), size=size, mode="bilinear", align_corners=True)


def augment(rng, image, label, crop, scales):
  scale = scales[rng.integers(len(scales))]
  h, w = (int(s * scale) for s in image.shape[:2])
  x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
  x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)[0]
  rows = np.round(np.linspace(0, label.shape[0] - 1, h)).astype(int)
  cols = np.round(np.linspace(0, label.shape[1] - 1, w)).astype(int)
  y = torch.from_numpy(label[rows][:, cols].astype(np.int64))
  ph, pw = max(crop - h, 0), max(crop - w, 0)
  x = F.pad(x, (0, pw, 0, ph), value=127.5)
  y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
  top, left = rng.integers(0, x.shape[1] - crop + 1), rng.integers(0, x.shape[2] - crop + 1)
  x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
  if rng.random() < 0.5:
    x, y = x.flip(-1), y.flip(-1)
  return x * (2 / 255) - 1, y


def evaluate(model, val, num_classes):
  model.eval()
  confusion = np.zeros((num_classes, num_classes), np.int64)
  with torch.no_grad():
    for image, label in val:
      x = torch.from_numpy(image).permute(2, 0, 1)[None].float() * (2 / 255) - 1
      pred = model(x)[0].argmax(0).numpy()
      confusion += np.bincount(label.ravel().astype(np.int64) * num_classes + pred.ravel(),
                               minlength=num_classes ** 2).reshape(num_classes, num_classes)
  model.train()
  iou = np.diag(confusion) / np.maximum(confusion.sum(0) + confusion.sum(1) - np.diag(confusion), 1)
  return float(iou.mean()), [round(float(v), 4) for v in iou]


def o_name(config) -> str:
  o = config.optim
  return f"{o.optimizer} lr {o.base_lr} warmup {o.warmup_steps} wd {o.weight_decay}"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=None, help="default: configs/shapes.py's")
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  config = shapes_config.get_config()
  steps = args.steps or config.train.steps
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(args.seed)
  num_classes, crop, batch = shapes.NUM_CLASSES, config.input.crop_size[0], config.train.batch_size
  train = list(shapes.generate_split(0, 2000))
  val = list(shapes.generate_split(1, 200))
  i = config.input
  scales = np.arange(i.min_scale, i.max_scale + 1e-6, i.scale_step)
  model = DeepLab(num_classes, config.model.depth_multiplier)
  print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "optimizer": o_name(config),
                    "steps": steps}), flush=True)
  o = config.optim
  decayed = [p for n, p in model.named_parameters() if p.ndim == 4 and p.shape[1] > 1]
  others = [p for n, p in model.named_parameters() if not (p.ndim == 4 and p.shape[1] > 1)]
  groups = [{"params": decayed, "weight_decay": o.weight_decay}, {"params": others, "weight_decay": 0}]
  if o.optimizer == "adam":
    opt = torch.optim.AdamW(groups, lr=o.base_lr, betas=(o.momentum, 0.999), eps=1e-8)
    for g in opt.param_groups:  # optax's decoupled decay is not multiplied by the base rate
      g["weight_decay"] = g["weight_decay"] / o.base_lr
  else:
    opt = torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum)

  def lr_at(step):
    if step < o.warmup_steps:
      return o.base_lr * step / o.warmup_steps
    return o.base_lr * (1 - (step - o.warmup_steps) / (steps - o.warmup_steps)) ** o.lr_power

  start, train_seconds, losses = time.perf_counter(), 0.0, []
  order = rng.permutation(len(train))
  for step in range(1, steps + 1):
    for g in opt.param_groups:
      g["lr"] = lr_at(step - 1)
    picks = [order[(step * batch + k) % len(order)] for k in range(batch)]
    pairs = [augment(rng, *train[p], crop, scales) for p in picks]
    x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % args.eval_every == 0 or step == steps:
      train_seconds += time.perf_counter() - start
      miou, per_class = evaluate(model, val, num_classes)
      start = time.perf_counter()
      print(json.dumps({"step": step, "train_seconds": round(train_seconds, 1),
                        "loss": round(float(np.mean(losses[-50:])), 4), "mean_iou": round(miou, 4),
                        "per_class_iou": per_class}), flush=True)


if __name__ == "__main__":
  main()

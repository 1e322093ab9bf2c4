"""The PyTorch side of compare_torch.py, in its own process so each framework runs with its own best
allocator (jemalloc made PyTorch slower, PERF_NOTES.md). Reads "train N" / "infer N" lines, runs N
steps, prints one JSON list of step times per line; idle while the JAX side runs."""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_deeplab  # noqa: E402

from deeplab_jax import allocator  # noqa: E402  (no jax import: it only reads LD_PRELOAD)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, required=True)
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--num_classes", type=int, default=21)
  parser.add_argument("--backbone", default="xception_65")
  parser.add_argument("--output_stride", type=int, default=16)
  parser.add_argument("--atrous_rates", default="6,12,18")
  parser.add_argument("--aspp_separable", type=int, default=1)
  parser.add_argument("--decoder_separable", type=int, default=1)
  args = parser.parse_args()
  torch.manual_seed(0)
  model = torch_deeplab.DeepLabV3Plus(
      args.num_classes, args.backbone, args.output_stride,
      tuple(int(r) for r in args.atrous_rates.split(",")), bool(args.aspp_separable),
      bool(args.decoder_separable))
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)
  images = torch.rand(args.batch, 3, args.size, args.size) * 255
  labels = torch.randint(0, args.num_classes, (args.batch, args.size, args.size))

  def train_step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits = torch_deeplab.resize(model(images), labels.shape[1:])
    F.cross_entropy(logits, labels, ignore_index=255).backward()
    optimizer.step()

  @torch.inference_mode()
  def infer_step():
    model.eval()
    torch_deeplab.resize(model(images), images.shape[2:])

  steps = {"train": train_step, "infer": infer_step}
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "params": torch_deeplab.parameter_count(model),
          "allocator": allocator.loaded()}
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    mode, count = line.split()
    times = []
    for _ in range(int(count)):
      start = time.perf_counter()
      steps[mode]()
      times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
  main()

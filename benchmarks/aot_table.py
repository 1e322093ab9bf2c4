"""The TPU table of benchmarks/README.md: every config rehearsed on the slices a user would pick for it.

  python benchmarks/aot_table.py             # rows not yet in aot_table.jsonl: does it fit, how fast
  python benchmarks/aot_table.py --search    # rows without a largest batch: find it (hours)
  python benchmarks/aot_table.py --markdown  # print the table from aot_table.jsonl
  (--first=N: only the first N rows of the order below)

Each row is `python -m deeplab_jax.aot` on one config, slice and variant (dtype, depthwise
formulation, remat): the train and eval steps at the config's batches, then (--search) the largest
train batch that fits, 5-8 compiles more. Results are appended to benchmarks/aot_table.jsonl as they
come, so an interrupted run goes on where it stopped. On a 2-core CPU an Xception-65 513x513 row
takes 5-8 minutes and its search 30-60. tests/test_benchmarks.py checks that the README's table is
this file's.
"""
from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "aot_table.jsonl")
VARIANTS = [(dtype, dw, remat) for dtype in ("bfloat16", "float32") for dw in ("shift", "grouped")
            for remat in (False, True)]
BF16, F32 = ("bfloat16", "auto", False), ("float32", "auto", False)
# (config, slice, [(dtype, depthwise, remat)]) in the order they are compiled, most asked first: the
# paper's recipe on 4 v5e chips (its batch 16 is 4 per chip) with the TPU defaults in both dtypes,
# every other config there, the reference depthwise formulation, the paper's recipe on every other
# slice, remat, the other configs on v4-8, then the rest.
FIRST = [("bfloat16", "shift", False), ("float32", "shift", False), ("bfloat16", "grouped", False)]
# shift is the TPU's "auto"
ROWS = ([("voc_xception", "v5litepod-4", FIRST[:2])] +
        [(c, "v5litepod-4", [BF16]) for c in ("voc_resnet101", "cityscapes_xception", "ade20k_xception")] +
        [("shapes", "v5litepod-4", [F32]), ("voc_xception", "v5litepod-4", FIRST[2:])] +
        [("voc_xception", s, [BF16]) for s in ("v4-8", "v5p-8", "v3-8", "v5litepod-8", "v5litepod-16",
                                               "v6e-4")] +
        [("voc_xception", "v5litepod-4", [("bfloat16", "shift", True)])] +
        [(c, "v4-8", [BF16]) for c in ("voc_resnet101", "cityscapes_xception", "ade20k_xception")] +
        [("voc_xception", "v5litepod-4", [v for v in VARIANTS
                                          if v not in FIRST + [("bfloat16", "shift", True)]])] +
        [("voc_xception", s, [F32]) for s in ("v4-8", "v5p-8", "v3-8")] +
        [(c, s, [F32]) for c in ("voc_resnet101", "cityscapes_xception", "ade20k_xception")
         for s in ("v5litepod-4", "v4-8")])


def key(config: str, topology: str, dtype: str, depthwise: str, remat: bool) -> str:
  return f"{config}|{topology}|{dtype}|{depthwise}|{'remat' if remat else 'noremat'}"


def load() -> dict[str, dict]:
  rows = {}
  if os.path.exists(RESULTS):
    with open(RESULTS) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows[row["key"]] = row
  return rows


def _config(name: str, dtype: str, depthwise: str, remat: bool):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(HERE), "configs",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.dtype, config.model.depthwise_impl, config.model.remat = dtype, depthwise, remat
  return config


def flat_rows() -> list[tuple[str, str, str, str, bool]]:
  """(config, slice, dtype, depthwise, remat) in the order ROWS gives."""
  return [(c, s, *v) for c, s, variants in ROWS for v in variants]


def run(search: bool, first: int | None = None) -> None:
  """Rows without a result (search=False), or without a largest batch (search=True); of the first
  `first` rows only, if given."""
  sys.path.insert(0, os.path.dirname(HERE))
  from deeplab_jax import accelerators, aot
  from deeplab_jax.errors import UserError
  done = load()

  def report(c):
    print(f"  compiled {c.step} at global batch {c.global_batch} in {c.compile_s:.0f} s: "
          f"{'fits' if c.fits else 'does not fit'}", flush=True)

  for config_name, topology, dtype, depthwise, remat in flat_rows()[:first]:
    k = key(config_name, topology, dtype, depthwise, remat)
    row = done.get(k)
    if row is not None and (not search or "error" in row or row.get("max_global_batch") is not None):
      continue  # compiled, and searched where asked (a row that ended in an error has no batch)
    print(k, flush=True)
    known = None
    if row is not None:
      target = accelerators.parse(topology)
      known = {"train": aot.from_summary(row, target, "train")}
      if row.get("eval"):
        known["eval"] = aot.from_summary(row["eval"], target, "eval")
    start = time.time()
    try:
      result = aot.rehearse(_config(config_name, dtype, depthwise, remat), topology,
                            search=("train",) if search else (), report=report, known=known)
    except UserError as e:  # e.g. a batch the slice's devices do not divide
      result = {"error": str(e)}
    row = {"key": k, "config": config_name, "slice": topology, "dtype": dtype,
           "depthwise": depthwise, "remat": remat, "wall_s": round(time.time() - start), **result}
    with open(RESULTS, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"{k}: {row.get('predicted_images_per_s_per_chip')} img/s/chip, max batch "
          f"{row.get('max_global_batch')} ({row['wall_s']} s)", flush=True)


def _gib(value) -> str:
  return "-" if value is None else f"{value:.1f}"


def markdown() -> str:
  """The README table: one line per row of ROWS that has a result."""
  done = load()
  lines = ["| config | slice | dtype | depthwise | remat | train batch fits (GiB/chip) | largest batch "
           "| GB/img | FLOP/B | img/s/chip | MFU | at the largest batch: img/s/chip, MFU | eval fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for config_name, topology, variants in ROWS:
    for dtype, depthwise, remat in variants:
      row = done.get(key(config_name, topology, dtype, depthwise, remat))
      if row is None:
        continue
      if "error" in row:
        lines.append(f"| {config_name} | {topology} | {dtype} | {depthwise} | {'on' if remat else 'off'} "
                     f"| {row['error']} | | | | | | | |")
        continue
      dw = depthwise if depthwise != "auto" else f"auto ({row['depthwise_impl']})"
      fits = f"{row['global_batch']}: {'yes' if row['fits'] else 'no'} ({_gib(row['peak_memory_per_chip_gib'])})"
      best = row.get("at_max_global_batch") or {}
      at_best = (f"{best['predicted_images_per_s_per_chip']:.1f}, {100 * best['predicted_mfu']:.1f}%"
                 if best else "-")
      if row["fits"]:
        speed = (f"{row['bytes_per_image'] / 1e9:.1f} | {row['flop_per_byte']:.1f} | "
                 f"{row['predicted_images_per_s_per_chip']:.1f} | {100 * row['predicted_mfu']:.1f}%")
      else:
        speed = "- | - | - | -"
      ev = row.get("eval") or {}
      eval_fits = f"{ev.get('global_batch')}: {'yes' if ev.get('fits') else 'no'}" if ev else "-"
      largest = "not searched yet" if row["max_global_batch"] is None else row["max_global_batch"]
      lines.append(f"| {config_name} | {topology} | {dtype} | {dw} | {'on' if remat else 'off'} | {fits} "
                   f"| {largest} | {speed} | {at_best} | {eval_fits} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if "--markdown" in sys.argv[1:]:
    print(markdown())
  else:
    first = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--first=")), None)
    run(search="--search" in sys.argv[1:], first=first)

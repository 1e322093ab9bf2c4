"""What the checkpoints' fingerprints cost (issue #27): the Xception-65 train state of
configs/voc_xception.py (parameters, BatchNorm statistics and momentum), saved and restored with and
without them, on whatever backend is present.

  python benchmarks/checkpoint_integrity.py [--repeats=3] [--workdir=/tmp/ckpt_bench]

Prints one JSON line: the state's size, the fingerprint pass (its first call includes the compile),
the blocking part and the total of a save, and a restore, each with and without fingerprints
(medians of `--repeats`); `restore_checked_s_without` is the restore with every other check (commit
marker, shapes) on a checkpoint that has no fingerprints. The arrays hold random values: the cost does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="/tmp/deeplab_jax_checkpoint_bench")
  parser.add_argument("--config", default="configs/voc_xception.py")
  args = parser.parse_args()

  import importlib.util
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from deeplab_jax import checkpoints, train

  spec = importlib.util.spec_from_file_location("config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  abstract = train.abstract_state(config)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype)
                                                if s.shape else np.zeros((), s.dtype)), abstract)
  state = jax.block_until_ready(state)
  size = sum(x.nbytes for x in jax.tree.leaves(state))

  def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  first = timed(lambda: checkpoints.fingerprints(state))
  steady = statistics.median(timed(lambda: checkpoints.fingerprints(state)) for _ in range(args.repeats))

  shutil.rmtree(args.workdir, ignore_errors=True)
  manager = checkpoints.create_manager(args.workdir, keep=None)
  plain = ocp.CheckpointManager(os.path.join(args.workdir, "plain"),
                                options=ocp.CheckpointManagerOptions(max_to_keep=None),
                                item_handlers={checkpoints.STATE: checkpoints._state_handler()})

  def save(with_fingerprints: bool, step: int) -> tuple[float, float]:
    start = time.perf_counter()
    if with_fingerprints:
      checkpoints.save(manager, step, state)
      target = manager
    else:
      plain.save(step, args=ocp.args.Composite(**{checkpoints.STATE: ocp.args.PyTreeSave(state)}))
      target = plain
    blocking = time.perf_counter() - start
    target.wait_until_finished()
    return blocking, time.perf_counter() - start

  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                       sharding=jax.sharding.SingleDeviceSharding(
                                                           jax.local_devices()[0])), abstract)

  def restore(with_fingerprints: bool, step: int) -> float:
    if with_fingerprints:
      return timed(lambda: checkpoints.restore(manager, step, target))
    results["without"]["restore_checked_s"].append(  # the same checks, no fingerprints to compare
        timed(lambda: checkpoints.restore(plain, step, target)))
    args_ = ocp.args.Composite(**{checkpoints.STATE: ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))})
    return timed(lambda: jax.block_until_ready(plain.restore(step, args=args_)[checkpoints.STATE]))

  results = {"with": {"save_blocking_s": [], "save_total_s": [], "restore_s": []},
             "without": {"save_blocking_s": [], "save_total_s": [], "restore_s": [],
                         "restore_checked_s": []}}
  for k in range(args.repeats + 1):  # the first round warms up (compiles, caches); not counted
    for label, flag in (("without", False), ("with", True)):
      blocking, total = save(flag, k)
      seconds = restore(flag, k)
      if not k:
        results["without"]["restore_checked_s"].clear()
      if k:
        results[label]["save_blocking_s"].append(blocking)
        results[label]["save_total_s"].append(total)
        results[label]["restore_s"].append(seconds)
  summary = {"config": args.config, "backend": jax.default_backend(), "state_mb": round(size / 1e6, 1),
             "arrays": len(jax.tree.leaves(state)), "fingerprint_first_s": round(first, 3),
             "fingerprint_s": round(steady, 3)}
  for label, values in results.items():
    for key, series in values.items():
      summary[f"{key}_{label}"] = round(statistics.median(series), 3)
  shutil.rmtree(args.workdir, ignore_errors=True)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()

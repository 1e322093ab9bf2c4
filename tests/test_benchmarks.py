"""The benchmark harness runs and reports its figures; the PyTorch reference is the same network."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_FLAGS, load_config
from deeplab_jax import native


def test_run_prints_the_issue_figures_as_one_json_line():
  flags = [f for f in TINY_FLAGS if not f.startswith("--config.dataset")]
  result = subprocess.run(
      [sys.executable, "benchmarks/run.py", "--config=configs/shapes.py", "--size=33", "--batch=2",
       "--mode=infer", "--steps=2", "--warmup=1", *flags], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("compile_s", "step_s", "images_per_s", "peak_mem_gb", "gmacs", "gflops_per_s",
              "matmul_gflops_per_s", "roofline_ratio", "page_faults_per_step"):
    assert out[key] >= 0, key
  assert out["step_s"] > 0 and out["gmacs"] > 0 and out["matmul_gflops_per_s"] > 0
  assert out["images_per_s"] == pytest.approx(2 / out["step_s"], rel=0.02)
  # The defaults: "auto" resolved for one CPU device, and the allocator requirements.txt brings.
  assert out["depthwise_impl"] == ("native" if native.available() else "shift")
  assert out["allocator"] == ("mimalloc" if sys.platform.startswith("linux") else "system")
  assert out["size"] == 33 and out["batch"] == 2


def test_the_pytorch_reference_has_the_jax_models_parameters():
  pytest.importorskip("torch")
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import torch_deeplab
  from deeplab_jax.models import complexity
  config = load_config(os.path.join(REPO, "configs", "voc_xception.py"))
  jax_stats = complexity.model_stats(config, 65)
  model = torch_deeplab.DeepLabV3Plus(21)
  assert torch_deeplab.parameter_count(model) == jax_stats["params"] == 41_055_413
  assert torch_deeplab.buffer_count(model) == jax_stats["batch_stats"]


def test_the_readme_tpu_table_is_aot_table_jsonl():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import aot_table
  text = open(os.path.join(REPO, "benchmarks", "README.md")).read()
  start, end = "<!-- aot_table.py --markdown -->\n", "<!-- end of aot_table.py --markdown -->"
  table = text[text.index(start) + len(start):text.index(end)].strip()
  assert table == aot_table.markdown().strip() or (not aot_table.load() and not table), (
      "benchmarks/README.md's TPU table is stale: paste python benchmarks/aot_table.py --markdown")


def test_tpu_ops_counts_what_the_cost_analysis_counts():
  """The per-instruction model behind benchmarks/README.md's TPU figures, on a real compiled step."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tpu_ops
  from deeplab_jax import accelerators, aot, sharding
  config = load_config(os.path.join(REPO, "configs", "shapes.py"))
  config.eval.crop_size = (65, 65)
  mesh = sharding.create_mesh(accelerators.devices(accelerators.parse("v5e:2x2")))
  compiled = aot.compile_step(config, mesh, "eval", 8)
  insts = tpu_ops.instructions(compiled.hlo)
  modelled = sum(i.cost for i in insts)
  assert modelled == pytest.approx(compiled.bytes_accessed, rel=0.05)
  assert 0 < sum(i.hbm for i in insts) <= modelled
  parts = {p for p, *_ in tpu_ops.by_part(insts)}
  assert {"fwd backbone", "fwd aspp", "fwd decoder"} <= {" ".join(p.split()[:1] + [p.split()[1].split("/")[0]])
                                                          for p in parts}

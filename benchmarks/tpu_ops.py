"""Where a step compiled for a TPU moves its bytes, per part of the model: read the optimized program.

  python benchmarks/tpu_ops.py --config=configs/voc_xception.py --topology=v5e:2x2 \\
      --config.model.dtype=bfloat16 [--step=train] [--top=20] [--hlo_out=FILE]

Compiles the step as `python -m deeplab_jax.aot` does and walks the optimized HLO of one device. Two
byte counts per instruction:
- "cost": what XLA's cost analysis counts (the roofline's bytes): operands plus output of every
  instruction at their tiled sizes (a slice reads only what it keeps), and an asynchronous copy or
  slice between HBM and on-chip memory (VMEM, the memory space S(1)) 4 times, as its start and its
  done each read and write the tensor. Summed, this model lands within 1-4% of
  `cost_analysis()["bytes accessed"]` on the steps of benchmarks/README.md (9% under with remat).
- "hbm": an estimate of HBM traffic: operands and outputs that live in HBM (no S(n) annotation), and
  each asynchronous copy once.
Instructions are attributed to the model part named in their source metadata (backbone block, ASPP,
decoder, loss, optimizer; forward or backward); asynchronous copies, which carry none, to the part
of their first user. The last line is one JSON object.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|s8|u8|bf16|f16|s16|u16|f32|s32|u32|f64|s64|u64)\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)$")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "conditional", "call",
         "while", "after-all", "partition-id", "replica-id", "opt-barrier", "copy-start", "slice-start",
         "add-dependency"}
_ASYNC_DONE = {"copy-done", "slice-done"}


def array_bytes(dtype: str, dims: str, layout: str | None) -> int:
  """Bytes of one array at its tiled layout: the tile T(a,b) pads the two most minor dimensions."""
  shape = [int(d) for d in dims.split(",")] if dims else []
  if layout and shape:
    minor_to_major, _, rest = layout[1:-1].partition(":")
    order = [int(d) for d in minor_to_major.split(",") if d.strip()]
    tile = re.search(r"T\((\d+)(?:,(\d+))?\)", rest)
    if tile and order:
      sizes = [int(tile[1])] + ([int(tile[2])] if tile[2] else [])
      for k, size in enumerate(reversed(sizes)):
        if k < len(order):
          shape[order[k]] = -(-shape[order[k]] // size) * size
  return math.prod(shape) * _BYTES[dtype]


def shape_bytes(shape: str, hbm_only: bool = False, dtype: str | None = None) -> int:
  """Bytes of the arrays in `shape` (a tuple's too); only those in HBM, or of one dtype, if asked."""
  total = 0
  for m in _ARRAY.finditer(shape):
    if hbm_only and m[3] and re.search(r"S\(\d+\)", m[3]):
      continue
    if dtype is None or m[1] == dtype:
      total += array_bytes(m[1], m[2], m[3])
  return total


def _counted(opcode: str, line: str, shape: str, operands: list, dtype: str | None = None) -> int:
  """What the cost analysis counts for one instruction (of one dtype's arrays, if given)."""
  if opcode in _ASYNC_DONE:  # its start and its done each read and write the tensor
    return 4 * shape_bytes(shape, dtype=dtype)
  if opcode == "custom-call" and "ConcatBitcast" in line:  # a view of its operands
    return 0
  if opcode in ("slice", "dynamic-slice"):  # reads only what it keeps
    return 2 * shape_bytes(shape, dtype=dtype)
  return shape_bytes(shape, dtype=dtype) + sum(shape_bytes(s, dtype=dtype) for s in operands)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list
  op_name: str
  cycles: int
  cost: int = 0
  hbm: int = 0
  f32: int = 0  # the part of `cost` in float32 arrays
  part: str = ""


def instructions(hlo: str) -> list[Instruction]:
  """The instructions a step executes: the entry computation's and those of the computations that
  its control flow calls (fusions' insides are not instructions of their own)."""
  computations, current, entry = {}, None, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{") and "%" in line:
      current = re.search(r"%([\w.\-]+)", line)[1]
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (m := _INSTRUCTION.match(line)):
      computations[current].append((m[1], m[2], m[3], m[4], line))
  executed, todo = [], [entry]
  while todo:
    name = todo.pop()
    if name in executed or name not in computations:
      continue
    executed.append(name)
    for _, _, opcode, _, line in computations[name]:
      if opcode in ("conditional", "while", "call"):
        for group in re.findall(r"(?:branch_computations=\{([^}]*)\}|body=%([\w.\-]+)|"
                                r"true_computation=%([\w.\-]+)|false_computation=%([\w.\-]+))", line):
          todo += [n for g in group for n in re.findall(r"%?([\w.\-]+)", g) if n]
  out, graph = [], {}
  for name in executed:
    shapes = {n: s for n, s, _, _, _ in computations[name]}
    for n, shape, opcode, rest, line in computations[name]:
      op_name = re.search(r'op_name="([^"]*)"', line)
      graph[n] = (re.findall(r"%([\w.\-]+)", rest.split("), ")[0]), op_name[1] if op_name else "")
      if opcode in _FREE:
        continue
      args = rest.split("), ")[0]
      operands = [shapes.get(o, "") for o in re.findall(r"%([\w.\-]+)", args)]
      op_name = re.search(r'op_name="([^"]*)"', line)
      cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
      inst = Instruction(n, shape, opcode, re.findall(r"%([\w.\-]+)", args),
                         op_name[1] if op_name else "", int(cycles[1]) if cycles else 0)
      inst.cost, inst.f32 = (_counted(opcode, line, shape, operands, dtype) for dtype in (None, "f32"))
      if opcode in _ASYNC_DONE:
        inst.hbm = shape_bytes(shape)
      elif opcode == "custom-call" and "ConcatBitcast" in line:  # a view of its operands
        pass
      elif opcode in ("slice", "dynamic-slice"):  # reads only what it keeps
        inst.hbm = shape_bytes(shape, True) + (shape_bytes(shape) if shape_bytes(operands[0], True) else 0)
      else:
        inst.hbm = shape_bytes(shape, True) + sum(shape_bytes(s, True) for s in operands)
      out.append(inst)
  _attribute(out, graph)
  return out


def part_of(op_name: str) -> str:
  """'fwd'/'bwd' and the model part an instruction's source metadata names."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  path = re.sub(r"(transpose\(|jvp\(|\)|jit\([\w]+\)/)", "", op_name).split("/")
  if "DeepLab" in path:
    rest = path[path.index("DeepLab") + 1:]
    if rest[:1] == ["backbone"] and len(rest) > 1:
      block = "middle_flow" if rest[1].startswith("middle_flow") else rest[1]
      kind = next((k for k in ("depthwise", "pointwise", "shortcut") if k in rest), "conv")
      return f"{direction} backbone/{block}/{kind}"
    kind = next((k for k in ("depthwise", "pointwise") if k in rest), "")
    return f"{direction} {rest[0] if rest else '?'}" + (f"/{kind}" if kind else "")
  if "cond" in path or "branch_1_fun" in path:
    return "optimizer update"
  if any(k in op_name for k in ("log_softmax", "segmentation_loss", "pixel_losses", "align_corners")):
    return f"{direction} loss and logits upsampling"
  return f"{direction} other"


def _attribute(insts: list[Instruction], graph: dict) -> None:
  """Each instruction's part; one without source metadata (an asynchronous copy) takes its source's
  (the activation it moves), else its first user's."""
  users = collections.defaultdict(list)
  for name, (operands, _) in graph.items():
    for o in operands:
      users[o].append(name)

  def walk(name: str, step, depth: int = 0) -> str:
    operands, op_name = graph.get(name, ((), ""))
    if op_name:
      return op_name
    if depth > 8:
      return ""
    for following in step(name, operands):
      found = walk(following, step, depth + 1)
      if found:
        return found
    return ""

  for i in insts:
    i.part = part_of(i.op_name or walk(i.name, lambda n, ops: ops) or walk(i.name, lambda n, ops: users[n]))


def by_part(insts: list[Instruction]) -> list[tuple[str, int, int, int, int]]:
  """(part, cost bytes, HBM bytes, estimated cycles, float32 cost bytes), largest cost first."""
  cost, hbm, cycles, f32 = (collections.Counter() for _ in range(4))
  for i in insts:
    cost[i.part] += i.cost
    hbm[i.part] += i.hbm
    cycles[i.part] += i.cycles
    f32[i.part] += i.f32
  return [(p, cost[p], hbm[p], cycles[p], f32[p]) for p, _ in cost.most_common()]


def main(argv):
  del argv
  from deeplab_jax import accelerators, aot, runtime, sharding
  FLAGS = flags.FLAGS

  def run():
    config = FLAGS.config
    target = accelerators.parse(FLAGS.topology)
    mesh = sharding.create_mesh(accelerators.devices(target))
    batch = int((config.train if FLAGS.step == "train" else config.eval).batch_size)
    compiled = aot.compile_step(config, mesh, FLAGS.step, batch)
    if not compiled.fits:
      raise aot.DoesNotFitError(f"the {FLAGS.step} step at batch {batch} does not fit {FLAGS.topology}")
    if FLAGS.hlo_out:
      with open(FLAGS.hlo_out, "w") as f:
        f.write(compiled.hlo)
    return compiled

  compiled = runtime.run_command(run, compile_cache=False)  # see deeplab_jax.aot
  insts = instructions(compiled.hlo)
  images = compiled.global_batch / accelerators.parse(FLAGS.topology).devices

  def per_image(nbytes):
    return nbytes / images / 1e9

  cost = sum(i.cost for i in insts)
  hbm = sum(i.hbm for i in insts)
  cycles = sum(i.cycles for i in insts)
  copies = sum(i.cost for i in insts if i.opcode in _ASYNC_DONE)
  f32 = sum(i.f32 for i in insts)
  print(f"{FLAGS.step} step, {images:g} images per device: cost analysis {compiled.bytes_accessed / 1e9:.1f} GB "
        f"(this model: {cost / 1e9:.1f} GB, {100 * copies / max(cost, 1):.0f}% of it asynchronous copies "
        f"counted 4x, {100 * f32 / max(cost, 1):.0f}% in float32 arrays), HBM estimate {hbm / 1e9:.1f} GB; "
        f"{compiled.flops / 1e9:.0f} GFLOP; the compiler's estimated cycles {cycles / 1e6:.1f} M")
  print(f"{'part':48s} {'cost GB/img':>11s} {'float32':>7s} {'HBM GB/img':>10s} {'Mcycles':>8s}")
  rows = by_part(insts)
  for part, c, h, cy, f in rows[:FLAGS.top]:
    print(f"{part:48s} {per_image(c):11.2f} {100 * f / max(c, 1):6.0f}% {per_image(h):10.2f} {cy / 1e6:8.1f}")
  print(json.dumps({
      "step": FLAGS.step, "images_per_device": images, "flops": compiled.flops,
      "cost_analysis_bytes": compiled.bytes_accessed, "model_cost_bytes": cost, "async_copy_cost_bytes": copies,
      "hbm_estimate_bytes": hbm, "estimated_cycles": cycles, "float32_cost_bytes": f32,
      "flop_per_byte": compiled.flops / compiled.bytes_accessed,
      "flop_per_hbm_byte": compiled.flops / hbm if hbm else None,
      "parts": {p: {"cost_gb_per_image": round(per_image(c), 3), "hbm_gb_per_image": round(per_image(h), 3),
                    "mcycles": round(cy / 1e6, 2), "float32_cost_gb_per_image": round(per_image(f), 3)}
                for p, c, h, cy, f in rows}}))


if __name__ == "__main__":
  from ml_collections import config_flags
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2", "The slice (deeplab_jax.accelerators).")
  flags.DEFINE_enum("step", "train", ["train", "eval"], "Which step.")
  flags.DEFINE_integer("top", 20, "Parts listed.")
  flags.DEFINE_string("hlo_out", None, "Also write the optimized HLO here.")
  flags.mark_flags_as_required(["config"])
  app.run(main)

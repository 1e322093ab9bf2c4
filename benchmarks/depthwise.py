"""Forward and backward (input + filter gradient) times of each depthwise formulation on the
Xception-65 DeepLabv3+ shapes at 257x257, batch 2 (OS16).

  python benchmarks/depthwise.py [--impls=native,shift,grouped]
"""
from deeplab_jax import allocator

if __name__ == "__main__":
  allocator.reexec_with_fast_allocator()

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deeplab_jax.models import layers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

flags.DEFINE_list("impls", ["native", "shift", "grouped"], "Formulations to time.")
FLAGS = flags.FLAGS
# (input shape, stride, rate): entry flow, middle flow, exit flow, ASPP, decoder.
SHAPES = [((2, 129, 129, 128), 1, 1), ((2, 129, 129, 256), 2, 1), ((2, 65, 65, 256), 1, 1),
          ((2, 17, 17, 728), 1, 1), ((2, 17, 17, 1536), 1, 2), ((2, 17, 17, 2048), 1, 6),
          ((2, 65, 65, 304), 1, 1)]


def median_ms(fn, *args) -> float:
  return harness.median_seconds(fn, *args) * 1e3


def main(argv):
  del argv
  print(f"{'input':<22} {'s':>2} {'r':>2} " + " ".join(f"{i + ' fwd/bwd ms':>22}" for i in FLAGS.impls))
  for shape, stride, rate in SHAPES:
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, shape[-1])), jnp.float32)
    cells = []
    for impl in FLAGS.impls:
      conv = lambda x, k, impl=impl: layers.depthwise_conv2d(x, k, stride, rate, impl=impl)  # noqa: E731
      g = jnp.ones_like(jax.eval_shape(conv, x, k))
      forward = jax.jit(conv)
      backward = jax.jit(lambda x, k, g, conv=conv: jax.vjp(conv, x, k)[1](g))
      cells.append(f"{median_ms(forward, x, k):>10.2f} / {median_ms(backward, x, k, g):>9.2f}")
    print(f"{str(shape):<22} {stride:>2} {rate:>2} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
  app.run(main)

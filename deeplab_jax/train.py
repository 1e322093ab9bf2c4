"""Training and evaluation loop. The loop itself arrives with issue #3; the entry point exists now."""
from __future__ import annotations

from absl import logging

from deeplab_jax.models import complexity


def train_and_evaluate(config, workdir: str) -> None:
  """Validate the config and build its model; the training loop is not built yet."""
  stats = complexity.model_stats(config, size=65)
  logging.info("model %s: %s trainable parameters", config.model.backbone, f"{stats['params']:,}")
  print(f"deeplab_jax: training is not built yet (issue #3). The config is valid and its "
        f"{config.model.backbone} DeepLab has {stats['params']:,} trainable parameters; "
        f"nothing was written to {workdir}.")

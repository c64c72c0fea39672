"""A 200-step tiny run on the bundled synthetic corpus: the loss falls below a stated threshold and
the aux-loss-free bias brings the expert load max/mean back down after routing concentrates."""
import jax
import numpy as np
import pytest

from dsv3_jax import TINY, RuntimeConfig
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.cli import bundled_token_file
from dsv3_jax.train.data import TokenDataset
from dsv3_jax.train.optim import OptimConfig
from dsv3_jax.train.trainer import TrainConfig, Trainer

# Byte-level CE starts at ln(256) = 5.55 nats; the corpus (a small grammar) is learnable to well
# below 2 nats/byte in 200 steps. Measured here: total loss ~1.4 (CE ~1.05) at step 200.
LOSS_THRESHOLD = 2.0
# XLA CPU at optimisation level 1: compiling the train step at the default level cost more CPU
# than running its 200 steps (49 + 31 CPU-s); level 1 compiles in 34 with the same step time
# (level 0 compiles in 24 but runs the steps 2.5x slower). The losses and ratios differ only by
# float32 reassociation (measured: last-10 loss 1.31, ratio 1.58; default level: 1.26, 1.57).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@pytest.mark.slow
def test_200_steps_loss_falls_and_load_balances(tmp_path):
  data = TokenDataset(bundled_token_file(str(tmp_path)), seq_len=64, batch_size=8, eos_id=0,
                      vocab_size=256)
  train = TrainConfig(steps=200, optim=OptimConfig(lr=3e-3, warmup_steps=10, total_steps=200))
  # On one device, as `dsv3 demo` trains: what converges (the loss, the router bias rule) does
  # not depend on the mesh, and sharding a 0.3M-parameter model over the 8 simulated devices adds
  # only collectives (tests/test_mesh_entry.py checks sharded steps equal one device's).
  one = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  tr = Trainer(TINY, RuntimeConfig(), train, data, mesh=one, compiler_options=COMPILER_OPTIONS)
  hist = list(tr.run())
  loss = np.array([h["loss"] for h in hist])
  ratio = np.array([h["load_ratio"] for h in hist])
  assert loss[-10:].mean() < LOSS_THRESHOLD, loss[-10:]
  assert loss[-10:].mean() < loss[0] - 3.0
  # Routing concentrates while the model first learns (ratio rises well above its start), then
  # the bias rule pulls it back: the end is below both the peak/2 and the starting ratio.
  peak = ratio.max()
  assert ratio[-10:].mean() < 0.5 * peak and ratio[-10:].mean() < ratio[0], (ratio[0], peak, ratio[-10:])

"""One process of the 2-process x 4-CPU-device expert-parallel test (see test_sharding_model.py).

Usage: python -m tests.multihost_worker PROCESS_ID PORT OUT.npz
Joins a localhost coordinator (127.0.0.1:PORT) with JAX's gloo CPU collectives, builds the tiny
model sharded over a mesh {"expert": 8} spanning both processes (so every all-to-all crosses the
process boundary), runs one training step and, on process 0, writes loss, logits, gradients and
updated parameters (gathered from both processes) to OUT.npz.
"""
import os
import sys


def main(argv):
  pid, port, out = int(argv[0]), int(argv[1]), argv[2]
  os.environ["JAX_PLATFORMS"] = "cpu"
  # (plus the test run's XLA:CPU flags, tests/conftest.py, passed on in DSV3_TEST_CPU_FLAGS)
  os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=4",
                                      *os.environ.get("DSV3_TEST_CPU_FLAGS", "").split()])
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  jax.config.update("jax_default_matmul_precision", "highest")
  from dsv3_jax.sharding import (DistributedConfig, ShardingRules, initialize_distributed,
                                 make_mesh)
  initialize_distributed(DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2,
                                           process_id=pid, cpu_collectives="gloo", timeout_s=60))
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                                jax.device_count())
  from tests.sharding_case import build, flat

  mesh = make_mesh({"expert": 8})
  step, params, rest, tok = build(mesh, ShardingRules())
  with jax.set_mesh(mesh):
    new_params, loss, logits, grads = step(params, rest, tok)
  gathered = {"loss": loss, "logits": logits}
  gathered.update({"grad." + k: v for k, v in flat(grads).items()})
  gathered.update({"new." + k: v for k, v in flat(new_params).items()})
  gathered = multihost_utils.process_allgather(gathered, tiled=True)
  if pid == 0:
    tmp = out + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in gathered.items()})
    os.replace(tmp, out)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])

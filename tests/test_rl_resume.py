"""`dsv3 grpo` killed with SIGKILL mid-run and rerun reproduces the uninterrupted run's metrics
exactly (prompts and sampling seeds are functions of (seed, step); the state is restored from the
last checkpoint and the steps after it are run again), and writes metrics.jsonl + the plot."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from dsv3_jax.cli import main
from dsv3_jax.rl.demo import demo_config
from dsv3_jax.rl.loop import DETERMINISTIC
from dsv3_jax.rl.policy import PolicyTrainer
from dsv3_jax.rl.tasks import write_byte_tokenizer
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.optim import OptimConfig
from dsv3_jax.train.trainer import write_run_config
from tests.utils import ROOT, fast_compiles, random_model

CFG = demo_config().replace(num_hidden_layers=1, first_k_dense_replace=0)


def make_init(path):
  one = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  pol = PolicyTrainer(random_model(CFG, seed=7, std=0.05), OptimConfig(total_steps=1), mesh=one,
                      out_dir=path)
  pol.save({}, force=True)
  pol.close()
  write_run_config(path, CFG)
  write_byte_tokenizer(path)


def varied_reward(completion: str, example) -> float:
  """A reward that differs between the sampled completions of a group (correctness is 0 for every
  completion of this random model on some jax versions, which gives zero advantages and a policy
  that never moves): the resume check then covers a policy that changes every step."""
  return float(sum(map(ord, completion)) % 7)


def rows(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow  # ~75 CPU-s: started first under xdist (tests/conftest.py)
def test_grpo_resume_after_kill9_matches(tmp_path):
  init = str(tmp_path / "init")
  make_init(init)
  flags = ["--init", init, "--steps", "4", "--prompts", "4", "--group-size", "2",
           "--max-new-tokens", "6", "--save-every", "1", "--eval-prompts", "0", "--lr", "1e-2",
           "--temperature", "1.5", "--reward", "tests.test_rl_resume:varied_reward"]
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  # The run to kill: a child process with this process's environment (8 CPU devices, the
  # default mesh), so that its numbers are those of an in-process run.
  # Every run compiles without XLA's CPU optimisations (compiling, not running 4 tiny steps, is
  # this test's cost): the child through jax's flag from the environment, this process through
  # `fast_compiles`, so all runs compile the same programs with the same options (and the
  # persistent compilation cache serves this process what the child compiled).
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "dsv3_jax.cli", "grpo", *flags, "--out", run_dir],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(rows(run_dir)) >= 2:
        break
      time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  killed_at = len(rows(run_dir))
  assert 2 <= killed_at < 4
  with fast_compiles():
    assert main(["grpo", *flags, "--out", ref_dir]) == 0
    assert main(["grpo", *flags, "--out", run_dir]) == 0
  want, got = rows(ref_dir), rows(run_dir)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for a, b in zip(got, want):
    assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, a["step"]
  assert any(r["kl"] > 0 for r in want)  # the policy moved away from the reference
  assert os.path.getsize(os.path.join(run_dir, "grpo_curves.png")) > 0

"""The whole checkpoint flow as a user runs it: `dsv3` commands in subprocesses, relative paths,
the working directory a fresh folder.

  HF checkpoint (official tensor names, written by `save_pretrained`)
  -> dsv3 convert hf conv                    one standard Orbax PyTree checkpoint
  -> dsv3 generate --checkpoint conv
  -> dsv3 train --init conv --out run        killed with SIGKILL after step 6, then resumed
  -> dsv3 generate --checkpoint run          (the run's latest step)
  -> dsv3 export run ex1 / dsv3 export run/checkpoints/10 ex2: identical bytes (in this process)

Oracles: the HF tensors (the converted and restored parameters must equal them, bf16-rounded);
plain Orbax restoring both parameter trees in a process that imports no dsv3 code; an
uninterrupted run's metrics rows (the killed + resumed run must log each step once, with the
same losses: training is deterministic given the data order and the checkpoint).
"""
import json
import os
import signal
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.cli import main as dsv3_main
from dsv3_jax.config import TINY
from tests.test_convert_fixtures import all_tensors, bits
from tests.utils import FAST_COMPILE_FLAGS, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TINY.replace(num_hidden_layers=2)  # one dense layer, one MoE layer, one MTP layer
TRAIN = ["--batch", "2", "--seq", "16", "--save-every", "4", "--steps", "10", "--lr", "1e-3"]


def _env(cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # The commands share JAX's persistent compilation cache (beside the working directory): the
  # second `generate` and the resumed `train` load the programs the first ones compiled.
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS=FAST_COMPILE_FLAGS,
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(cwd), "jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(cwd, *argv, code=None, timeout=240):
  cmd = [sys.executable, *(["-c", code] if code else ["-m", "dsv3_jax.cli"]), *argv]
  return subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                        timeout=timeout)


def _ok(r):
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  return r


# Kills the process (SIGKILL: nothing can clean up) when it is about to train step 7, i.e. after
# step 6's metrics row and the step-4 checkpoint were written.
KILL_AT_STEP_7 = """
import os, signal, sys
from dsv3_jax.train import trainer
real = trainer.Trainer.train_step
def train_step(self, batch):
  if self.step == 6:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(self, batch)
trainer.Trainer.train_step = train_step
from dsv3_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Restores a parameter tree with Orbax alone and saves a few leaves for the test to compare.
# (float32 copies: bf16 -> fp32 is exact, and npz files do not know bfloat16.)
PLAIN_ORBAX = """
import os, sys, numpy as np, orbax.checkpoint as ocp
for src, out in zip(sys.argv[1::2], sys.argv[2::2]):
  tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(src))  # Orbax wants absolute paths
  leaves = dict(embed=tree["embed_tokens"], q_a=tree["layers"]["0"]["self_attn"]["q_a_proj"]["kernel"],
                up=tree["layers"]["1"]["mlp"]["experts"]["up_proj"], head=tree["lm_head"]["kernel"])
  np.savez(out, dtype=str(leaves["head"].dtype),
           **{k: np.asarray(v).astype(np.float32) for k, v in leaves.items()})
assert "dsv3_jax" not in sys.modules
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A working directory holding the HF checkpoint `hf` (relative name)."""
  import dsv3_jax
  cwd = tmp_path_factory.mktemp("flow")
  # The tests' numpy-drawn weights (`tests.utils.random_model`), not an eager nnx init: that
  # compiles every initialiser op apart (~10 s here), and no check depends on how the weights
  # were drawn (the oracles are the HF tensors written here).
  dsv3_jax.save_pretrained(random_model(CFG, seed=3), str(cwd / "hf"))
  return cwd


def _tokens(r):
  return [int(t) for t in r.stdout.split()]


@pytest.mark.slow
def test_convert_generate_train_kill_resume_generate_export(work, monkeypatch):
  cwd = str(work)
  _ok(_run(cwd, "convert", "hf", "conv", "--no-progress"))
  gen = ["--prompt-ids", "5,17,42,7", "--max-new-tokens", "6", "--dtype", "float32"]
  before = _tokens(_ok(_run(cwd, "generate", "--checkpoint", "conv", *gen)))
  assert len(before) == 6

  train = ["train", "--init", "conv", "--out", "run", *TRAIN]
  r = _run(cwd, *train, code=KILL_AT_STEP_7)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  steps = [json.loads(line)["step"] for line in open(work / "run" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6]  # flushed per step; the resume trains 5 and 6 again
  assert "resumed from step 4" in _ok(_run(cwd, *train)).stdout
  rows = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")]
  assert [row["step"] for row in rows] == list(range(1, 11))

  after = _tokens(_ok(_run(cwd, "generate", "--checkpoint", "run", *gen)))
  assert len(after) == 6
  # The exports run `dsv3 export` in this process (the commands above cover the entry point).
  monkeypatch.chdir(work)
  assert dsv3_main(["export", "run", "ex1", "--no-progress"]) == 0
  assert dsv3_main(["export", os.path.join("run", "checkpoints", "10"), "ex2", "--no-progress"]) == 0
  names = sorted(os.listdir(work / "ex1"))
  assert names == sorted(os.listdir(work / "ex2")) and "config.json" in names
  for name in names:
    assert (work / "ex1" / name).read_bytes() == (work / "ex2" / name).read_bytes(), name

  # Plain Orbax (no dsv3 import) restores both parameter trees; they hold what they should.
  _ok(subprocess.run([sys.executable, "-c", PLAIN_ORBAX, os.path.join("conv", "params", "state"),
                      "conv.npz", os.path.join("run", "checkpoints", "10", "params"), "run.npz"],
                     cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=120))
  hf, ex = all_tensors(str(work / "hf")), all_tensors(str(work / "ex1"))
  conv, run = np.load(work / "conv.npz"), np.load(work / "run.npz")
  bf16 = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)  # noqa: E731
  expect = {"embed": hf["model.embed_tokens.weight"],
            "q_a": hf["model.layers.0.self_attn.q_a_proj.weight"].T,
            "up": np.stack([hf[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].T
                            for e in range(CFG.n_routed_experts)]),
            "head": hf["lm_head.weight"].T}
  assert str(conv["dtype"]) == "bfloat16" and str(run["dtype"]) == "float32"
  for k, want in expect.items():  # the converted tree: the HF tensors in bf16, bit for bit
    np.testing.assert_array_equal(bits(bf16(conv[k])), bits(bf16(want)), err_msg=k)
  # The run's tree: fp32 master weights, moved by training, exported rounded to bf16.
  assert not np.array_equal(bf16(run["head"]), bf16(expect["head"]))
  np.testing.assert_array_equal(bits(bf16(run["head"].T)), bits(ex["lm_head.weight"]))
  np.testing.assert_array_equal(bits(bf16(run["up"][3].T)), bits(ex["model.layers.1.mlp.experts.3.up_proj.weight"]))
  assert sorted(ex) == sorted(hf)  # the same official names (MTP layer included) come back


def test_relative_paths_in_process(work, monkeypatch):
  """from_pretrained / convert / export with paths relative to the working directory (Orbax
  itself requires absolute ones)."""
  import dsv3_jax
  from dsv3_jax.convert import convert, export
  from tests.test_convert import _assert_same_params
  monkeypatch.chdir(work)
  assert convert("hf", "rel", dtype="float32", progress=False) == str(work / "rel")
  _assert_same_params(dsv3_jax.from_pretrained("rel"), dsv3_jax.from_pretrained("hf"))
  export("rel", "rel_ex", dtype="float32", progress=False)
  hf, ex = all_tensors("hf"), all_tensors("rel_ex")
  assert sorted(hf) == sorted(ex)
  for name in hf:
    np.testing.assert_array_equal(bits(ex[name]), bits(hf[name]), err_msg=name)


def test_train_config_from_init_and_run(work, tmp_path):
  """--init takes the checkpoint's config (a disagreeing --config is a one-line error naming the
  fields); without flags a run directory's own config.json is used."""
  from dsv3_jax.errors import UserError
  from dsv3_jax.train.cli import run_config
  from dsv3_jax.train.trainer import write_run_config
  hf, out = str(work / "hf"), str(tmp_path / "run")
  assert run_config(None, hf, out) == CFG
  with pytest.raises(UserError, match=r"--config tiny disagrees .* num_hidden_layers"):
    run_config("tiny", hf, out)
  assert run_config(None, None, out) == TINY  # the default
  write_run_config(out, CFG)
  assert run_config(None, None, out) == CFG  # resuming: the run's own config

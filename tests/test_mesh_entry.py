"""One program, any mesh: `Trainer`, `Generator`, `from_pretrained` and the `dsv3 train` /
`dsv3 generate` CLIs on 8 simulated CPU devices give the single-device results.

Oracle: the same entry point on a mesh of one device (`make_mesh({"fsdp": 1}, devices[:1])`).
Tolerances (fp32, matmul precision "highest"): losses rtol 1e-5 and parameters after 3 AdamW
steps atol 1e-6 + rtol 1e-5; sharding only reorders float32 sums (observed ~1e-7). The optimizer
eps is 1e-3 here: with the default 1e-8, Adam's first steps are lr * sign(g), which turns the
float reassociation noise of near-zero gradients into whole lr-sized steps (observed 7e-5 with
lr 1e-2) and would hide real errors behind a loose bound. Generation is greedy: tokens equal.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dsv3_jax
from dsv3_jax.config import TINY, RuntimeConfig
from dsv3_jax.inference import Generator
from dsv3_jax.inference.generate import COMPILED
from dsv3_jax.pretrained import stacked_variables
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.cli import bundled_token_file
from dsv3_jax.train.data import TokenDataset
from dsv3_jax.train.optim import OptimConfig
from dsv3_jax.train.trainer import TrainConfig, Trainer
from tests import utils
from tests.utils import (FAST_COMPILE, FAST_COMPILE_FLAGS, ROOT, assert_close, free_port,
                         run_processes)

# One MoE layer and one MTP block (MoE): expert parallelism in both, small compiles.
CFG = TINY.replace(num_hidden_layers=1, first_k_dense_replace=0)
MESH = {"fsdp": 2, "expert": 2, "tensor": 2}
TC = TrainConfig(steps=3, optim=OptimConfig(lr=1e-2, warmup_steps=0, total_steps=3, eps=1e-3),
                 bias_gamma=1e-2)
BATCH, SEQ = 8, 16
EXPERTS = "stacks.0.block.mlp.experts.gate_proj"  # [layers, E, D, F]


def one_device():
  return make_mesh({"fsdp": 1}, devices=jax.devices()[:1])


def flat(tree) -> dict:
  """{"stacks.0.block.mlp.experts.gate_proj": array, ...} (Variable boxes dropped from paths)."""
  names = lambda path: (str(getattr(k, "key", getattr(k, "name", k))) for k in path)  # noqa: E731
  return {".".join(n for n in names(path) if n not in ("", "value")): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return bundled_token_file(str(tmp_path_factory.mktemp("corpus")))


def _trainer(corpus, mesh, out_dir=None):
  data = TokenDataset(corpus, seq_len=SEQ, batch_size=BATCH, eos_id=0, vocab_size=CFG.vocab_size)
  return Trainer(CFG, RuntimeConfig(), TC, data, out_dir=out_dir, mesh=mesh, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def single(corpus):
  tr = _trainer(corpus, one_device())
  losses = [m["loss"] for m in tr.run()]
  state = {k: np.asarray(v) for k, v in flat(tr.state["params"]).items()}
  state.update({k: np.asarray(v) for k, v in flat(tr.state["rest"]).items()})
  return losses, state


def test_sharded_trainer_matches_single_device(single, corpus, tmp_path):
  ref_losses, ref_state = single
  mesh = make_mesh(MESH)
  tr = _trainer(corpus, mesh, out_dir=str(tmp_path))
  # Created in its shardings: experts over expert x fsdp x tensor, their Adam moments alike.
  params = flat(tr.state["params"])
  assert params[EXPERTS].sharding.spec == P(None, "expert", "fsdp", "tensor")
  assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")
  shard = params[EXPERTS].addressable_shards[0].data
  assert shard.shape == (CFG.num_hidden_layers, CFG.n_routed_experts // 2, CFG.hidden_size // 2,
                         CFG.moe_intermediate_size // 2)
  mu = {k: v for k, v in flat(tr.state["opt"]).items() if ".mu." in k}
  assert [v.sharding.spec for k, v in mu.items() if k.endswith(EXPERTS)] == \
      [P(None, "expert", "fsdp", "tensor")]
  losses = [m["loss"] for m in tr.run()]
  assert_close(losses, ref_losses, atol=0, rtol=1e-5, what="losses")
  assert ref_losses[-1] < ref_losses[0] - 0.1  # the steps really train
  got = {**flat(tr.state["params"]), **flat(tr.state["rest"])}
  assert set(got) == set(ref_state)
  for k, v in got.items():
    assert_close(np.asarray(v), ref_state[k], atol=1e-6, rtol=1e-5, what=k)
  bias = [k for k in got if k.endswith("e_score_correction_bias")]
  assert bias and np.abs(ref_state[bias[0]]).max() > 1e-3  # the router bias moved
  assert got[EXPERTS].sharding.spec == P(None, "expert", "fsdp", "tensor")
  # A checkpoint restores into the same shardings and values.
  before = {k: np.asarray(v) for k, v in flat(tr.state).items()}
  specs = {k: v.sharding.spec for k, v in flat(tr.state).items()}
  assert tr.restore(3)
  after = flat(tr.state)
  assert {k: v.sharding.spec for k, v in after.items()} == specs
  for k, v in after.items():
    np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
  tr.close()


# Generation -------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 33], [7 + 3 * i for i in range(11)], [200, 9, 9, 41, 2, 250], [1, 2, 3, 4]]


def random_model(seed: int = 0):
  """CFG with std-0.08 weights (logits O(1), routing varies, greedy choices not near-ties),
  built from numpy (no jitted init)."""
  return utils.random_model(CFG, seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  dsv3_jax.save_pretrained(random_model(), str(path))
  return path


@pytest.fixture(scope="module")
def single_tokens(checkpoint):
  g = Generator(dsv3_jax.from_pretrained(checkpoint), mesh=one_device(), compiler_options=FAST_COMPILE)
  return {spec: g.run(PROMPTS, max_new_tokens=8, eos_token_id=(), speculative=spec).tokens
          for spec in (False, True)}


@pytest.mark.parametrize("source", ["hf", "orbax"])
def test_sharded_generate_matches_single_device(source, checkpoint, single_tokens, tmp_path):
  from dsv3_jax.convert import convert
  mesh = make_mesh(MESH)
  path = checkpoint if source == "hf" else convert(checkpoint, tmp_path / "orbax",
                                                   dtype="float32", progress=False)
  model = dsv3_jax.from_pretrained(path, mesh=mesh)  # loaded straight into the shardings
  w = stacked_variables(model)[EXPERTS].get_value()
  assert w.sharding.spec == P(None, "expert", "fsdp", "tensor") and w.sharding.mesh == mesh
  g = Generator(model, mesh=mesh, compiler_options=FAST_COMPILE)
  for spec in (False, True) if source == "hf" else (True,):
    got = g.run(PROMPTS, max_new_tokens=8, eos_token_id=(), speculative=spec)
    assert got.tokens == single_tokens[spec], spec
    assert all(len(t) == 8 for t in got.tokens)
  # The latent cache (and every per-sequence field) is split on the batch: 4 prompts over the
  # batch axes fsdp x expert.
  prefill = [c for k, c in COMPILED.items() if k[0] == "prefill" and k[2] == mesh]
  assert prefill
  gs = prefill[-1].output_shardings
  for buf in jax.tree.leaves(gs.cache):  # kv [layers, B, S, 576], lengths [B]
    assert buf.spec[1 if len(buf.spec) > 1 else 0] == ("fsdp", "expert"), buf.spec
  assert gs.out.spec[0] == ("fsdp", "expert")
  # heads: [layers, H, ...] per layer stack, [H, ...] per MTP block
  assert all(a.sharding.spec[a.ndim - 3] == "tensor" for a in jax.tree.leaves(g.absorbed))


# CLIs ---------------------------------------------------------------------------------------------
def _cli_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS)
  return env


def _cli(*argv, timeout=240):
  return subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *argv], cwd=ROOT, env=_cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def _train_argv(tmp_path, out):
  cfg_path = tmp_path / "config.json"
  cfg_path.write_text(json.dumps(CFG.to_hf_config()))
  return ["train", "--config", str(cfg_path), "--mesh", "fsdp=4,expert=2", "--steps", "2",
          "--batch", str(BATCH), "--seq", str(SEQ), "--out", str(out), "--save-every", "2"]


def _metrics(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_train(tmp_path_factory):
  """`dsv3 train --mesh fsdp=4,expert=2` in one process with 8 CPU devices: its metrics rows."""
  tmp = tmp_path_factory.mktemp("cli_train")
  r = _cli(*_train_argv(tmp, tmp / "run"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh fsdp=4,expert=2 (8 cpu devices, 1 process(es))" in r.stdout
  return _metrics(tmp / "run")


def test_cli_train_and_generate_with_mesh(single, cli_train, checkpoint, single_tokens):
  assert [row["step"] for row in cli_train] == [1, 2]
  # Step 1's loss depends only on the init (seed 0, made in its shardings) and the batch.
  assert_close(cli_train[0]["loss"], single[0][0], atol=0, rtol=1e-5, what="CLI step-1 loss")
  assert np.isfinite(cli_train[1]["loss"])

  ids = PROMPTS[1]
  r = _cli("generate", "--checkpoint", str(checkpoint), "--prompt-ids", ",".join(map(str, ids)),
           "--max-new-tokens", "8", "--dtype", "float32", "--speculative", "--mesh", "expert=2,fsdp=-1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert [int(t) for t in r.stdout.split()] == single_tokens[True][1]


def test_cli_train_two_processes_matches_one(cli_train, tmp_path):
  """The same run as 2 processes x 4 CPU devices (gloo collectives): each process feeds its own
  rows of every batch (`process_rows`), experts are exchanged across the process boundary, and
  both write one Orbax checkpoint. Losses equal the 1-process run's."""
  out, port = tmp_path / "run", free_port()
  env = _cli_env()
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=4")
  argv = _train_argv(tmp_path, out) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                       "2", "--cpu-collectives", "gloo"]
  logs = run_processes([["-m", "dsv3_jax.cli", *argv, "--process-id", str(i)] for i in range(2)],
                       env, timeout=300)
  assert "mesh fsdp=4,expert=2 (8 cpu devices, 2 process(es))" in logs[0]
  rows = _metrics(out)
  assert [row["step"] for row in rows] == [1, 2]
  assert_close([r["loss"] for r in rows], [r["loss"] for r in cli_train], atol=0, rtol=1e-5,
               what="2-process losses")
  assert (out / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("cmd", ["train", "generate"])
@pytest.mark.parametrize("mesh, message", [
    ("fsdp=3", "needs 3 devices, but 8 are available"),
    ("fsdp=2,batch=4", "unknown axis 'batch'"),
    ("fsdp:8", "expected name=size"),
])
def test_bad_mesh_is_a_one_line_error(cmd, mesh, message, checkpoint, tmp_path, capsys):
  from dsv3_jax.cli import main
  argv = (["train", "--out", str(tmp_path)] if cmd == "train" else
          ["generate", "--checkpoint", str(checkpoint), "--prompt-ids", "1,2"])
  assert main(argv + ["--mesh", mesh]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"dsv3 {cmd}: error: --mesh {mesh!r}: ")
  assert message in err


def test_train_too_big_for_the_mesh_is_a_one_line_error(tmp_path, capsys):
  """4 layers of DeepSeek-V3 (~45B parameters, 12 bytes each with the AdamW moments) on 8
  CPU devices sharing this host: stopped before any allocation."""
  from dsv3_jax.cli import main
  cfg = dsv3_jax.DEEPSEEK_V3.replace(num_hidden_layers=4, quantization_config=None)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
  rc = main(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run"),
             "--batch", "8", "--seq", "16"])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1, err
  assert "GiB per device on mesh fsdp=8" in err and "dsv3 plan" in err and "--mesh" in err


def test_multi_host_environment_hand_cases():
  from dsv3_jax.sharding.entry import multi_host_environment
  assert not multi_host_environment({})
  assert not multi_host_environment({"TPU_WORKER_HOSTNAMES": "localhost"})  # one TPU VM
  assert multi_host_environment({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
  assert not multi_host_environment({"SLURM_NTASKS": "1"})
  assert multi_host_environment({"SLURM_NTASKS": "4"})
  assert multi_host_environment({"OMPI_COMM_WORLD_SIZE": "2"})

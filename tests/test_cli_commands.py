"""`dsv3 configs`, `dsv3 tokenize` (round trip through a trained byte-level BPE), `dsv3 eval`
(mean NLL against a numpy oracle), config.json errors that name file/field/line, and jinja2 as
a dependency of `--chat`."""
import json
import math
import os
import re
import tomllib

import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import ConfigError, ModelConfig
from tests.cli_helpers import (CFG, assert_user_error, run_cli, tiny_model, write_checkpoint,
                               write_word_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# dsv3 configs -------------------------------------------------------------------------------
def test_configs_list_show_check(capsys, tmp_path):
  rc, out, _ = run_cli(capsys, "configs")
  assert rc == 0 and re.search(r"^tiny +3 layers \(\+1 MTP\), hidden 64", out, re.M)
  assert re.search(r"^deepseek-v3 +61 layers .*vocab 129280", out, re.M)
  rc, out, _ = run_cli(capsys, "configs", "deepseek-v3")
  assert rc == 0 and ModelConfig.from_hf_config(json.loads(out)) == dsv3_jax.DEEPSEEK_V3
  p = tmp_path / "config.json"
  p.write_text(json.dumps(CFG.to_hf_config()))
  rc, out, _ = run_cli(capsys, "configs", p, "--check")
  assert rc == 0 and out.startswith(f"{p}: valid (2 layers")
  p.write_text(json.dumps({**CFG.to_hf_config(), "num_experts_per_tok": 99}))
  assert_user_error(run_cli(capsys, "configs", p, "--check"), "configs", str(p),
                    "num_experts_per_tok=99")
  assert_user_error(run_cli(capsys, "configs", "nano"), "configs", "'nano'", "tiny")


# config.json errors (issue 13 item 9) ---------------------------------------------------------
def _write(tmp_path, text):
  p = tmp_path / "config.json"
  p.write_text(text)
  return str(p)


def test_config_errors_name_file_field_and_line(tmp_path):
  raw = CFG.to_hf_config()
  del raw["hidden_size"]
  p = _write(tmp_path, json.dumps(raw))
  with pytest.raises(ConfigError, match=re.escape(f"{p}: missing field 'hidden_size'")):
    ModelConfig.from_hf_config(p)
  p = _write(tmp_path, json.dumps({**CFG.to_hf_config(), "num_hidden_layers": "2"}))
  with pytest.raises(ConfigError, match=re.escape(
      f"{p}: field 'num_hidden_layers' must be an integer, got '2' (str)")):
    ModelConfig.from_hf_config(p)
  p = _write(tmp_path, json.dumps({**CFG.to_hf_config(), "rms_norm_eps": "1e-6"}))
  with pytest.raises(ConfigError, match="'rms_norm_eps' must be a number, got '1e-6' \\(str\\)"):
    ModelConfig.from_hf_config(p)
  p = _write(tmp_path, json.dumps({**CFG.to_hf_config(), "q_lora_rank": None}))
  assert ModelConfig.from_hf_config(p).q_lora_rank is None  # null stays allowed where optional
  p = _write(tmp_path, '{\n  "vocab_size": 256,\n  "hidden_size": 64\n  "x": 1\n}')
  with pytest.raises(ConfigError, match=re.escape(f"{p}: malformed JSON at line 4 column 3")):
    ModelConfig.from_hf_config(p)
  p = _write(tmp_path, "[1, 2]")
  with pytest.raises(ConfigError, match="expected a JSON object, got list"):
    ModelConfig.from_hf_config(p)
  with pytest.raises(ConfigError, match="'hidden_size' must be an integer, got 64.5"):
    CFG.replace(hidden_size=64.5)
  assert issubclass(ConfigError, ValueError)  # existing `except ValueError` still catches it


# dsv3 tokenize -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  """A byte-level BPE trained here on a little text (decode(encode(x)) == x for any text)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("bpe")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sees a red ball in the garden. Ünïcode ✓"] * 20, trainer)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  return d


DOCS = ["The cat sees a red ball.\nIn the garden.", "Ünïcode ✓ and  two  spaces", "x"]


def test_tokenize_round_trip(capsys, tmp_path, bpe_dir):
  from tokenizers import Tokenizer
  txt = tmp_path / "a.txt"
  txt.write_text("\n\n".join(DOCS[:2]) + "\n\n\n")
  jl = tmp_path / "b.jsonl"
  jl.write_text(json.dumps({"text": DOCS[2], "id": 1}) + "\n")
  out = tmp_path / "tokens.u32"
  rc, text, _ = run_cli(capsys, "tokenize", txt, jl, "--tokenizer", bpe_dir, "--out", out)
  assert rc == 0 and "3 documents" in text
  tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
  eos = tok.token_to_id("</s>")
  ids = np.fromfile(out, "<u4")
  assert ids[-1] == eos and (ids == eos).sum() == 3
  docs = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
  assert [tok.decode(d[:-1].tolist()) for d in docs] == DOCS
  # the same tokens as .npy; an existing --out is kept unless --overwrite
  rc, _, _ = run_cli(capsys, "tokenize", txt, jl, "--tokenizer", bpe_dir, "--out", tmp_path / "t.npy")
  assert rc == 0 and np.array_equal(np.load(tmp_path / "t.npy"), ids)
  assert_user_error(run_cli(capsys, "tokenize", txt, "--tokenizer", bpe_dir, "--out", out),
                    "tokenize", str(out), "--overwrite")


def test_tokenize_errors(capsys, tmp_path, bpe_dir):
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
  for args, needles in [
      (["missing.txt"], ["missing.txt", "does not exist"]),
      ([tmp_path / "empty.txt"], ["empty.txt", "no documents"]),
      ([tmp_path / "bad.jsonl"], ["bad.jsonl: line 2", "'text'"]),
  ]:
    res = run_cli(capsys, "tokenize", *args, "--tokenizer", bpe_dir, "--out", tmp_path / "o.u32")
    assert_user_error(res, "tokenize", *needles)
    assert not (tmp_path / "o.u32").exists()
  res = run_cli(capsys, "tokenize", tmp_path / "empty.txt", "--tokenizer", bpe_dir, "--out",
                tmp_path / "o.txt")
  assert_user_error(res, "tokenize", "o.txt", "not a token file")


# dsv3 eval -----------------------------------------------------------------------------------
def test_eval_matches_numpy_nll(capsys, tmp_path):
  """Oracle: logits of each window from its own forward call, log-softmax and mean in float64
  numpy. fp32 model (one dense layer: the least to compile); tolerance 1e-4 relative (float32
  log-softmax vs float64)."""
  import jax.numpy as jnp
  from flax import nnx
  model = tiny_model(2, CFG.replace(num_hidden_layers=1, num_nextn_predict_layers=0))
  ckpt = write_checkpoint(model, str(tmp_path / "ckpt"), shards=False)
  rng = np.random.RandomState(0)
  seq, n_win = 16, 5
  ids = rng.randint(0, CFG.vocab_size, seq * n_win + 7)  # a tail shorter than a window
  from dsv3_jax.train.data import write_tokens
  write_tokens(tmp_path / "val.u32", ids)
  rc, out, _ = run_cli(capsys, "eval", "--quiet", "--checkpoint", ckpt, "--data",
                       tmp_path / "val.u32", "--seq", seq, "--batch", 2, "--dtype", "float32")
  assert rc == 0
  got = float(re.search(r"mean NLL (\S+) nats/token", out).group(1))
  ppl = float(re.search(r"perplexity (\S+)", out).group(1))
  fwd = nnx.jit(lambda m, t: m.forward(t).logits)
  nll = []
  for w in range(n_win):
    win = ids[w * seq:(w + 1) * seq]
    logits = np.asarray(fwd(model, jnp.asarray(win[None], jnp.int32)), np.float64)[0, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll.extend(logz - logits[np.arange(seq - 1), win[1:]])
  want = float(np.mean(nll))
  assert f"{len(nll)} predicted tokens in {n_win} windows" in out
  assert abs(got - want) <= 1e-4 * want, (got, want)
  assert abs(ppl - math.exp(want)) <= 1e-3 * math.exp(want)
  # errors: too long a window, ids beyond the vocabulary
  res = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "val.u32", "--seq", 1000)
  assert_user_error(res, "eval", "--seq 1000", "max_position_embeddings=512")
  write_tokens(tmp_path / "bad.u32", np.full(64, 999))
  res = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "bad.u32", "--seq", 16)
  assert_user_error(res, "eval", "bad.u32", "token id 999")


# --chat needs jinja2: a dependency (issue 13 item 10) ----------------------------------------
def test_jinja2_is_a_dependency_and_chat_renders(tmp_path):
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  assert any(re.match(r"jinja2\b", d, re.I) for d in deps), deps
  from dsv3_jax.inference import Tokenizer
  write_word_tokenizer(tmp_path, 64, chat_template=(
      "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"))
  tok = Tokenizer.from_dir(tmp_path)
  assert tok.encode_chat("w9 w10") == [3, 9, 10, 4]

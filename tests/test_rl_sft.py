"""SFT: the chat mask token by token, packing, the masked loss against unpacked numpy CE, the
data file errors, and distillation (`dsv3 generate --prompts --out` then `dsv3 sft`)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.errors import UserError
from dsv3_jax.inference.tokenizer import Tokenizer
from dsv3_jax.rl.demo import demo_config
from dsv3_jax.rl.sft import (SFTData, SFTObjective, TemplateError, pack, read_chat_jsonl,
                             render_chat)
from dsv3_jax.rl.tasks import write_byte_tokenizer
from tests.utils import FAST_COMPILE, assert_close, fast_compiles, random_model

USER, ASSISTANT, EOS = 257, 258, 256
CFG = demo_config().replace(num_hidden_layers=1, first_k_dense_replace=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  write_byte_tokenizer(d)
  return Tokenizer.from_dir(d)


def b(text):
  return list(text.encode())


def test_chat_mask_token_by_token(tok):
  conv = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"},
          {"role": "user", "content": "é?"}, {"role": "assistant", "content": "<think>a</think>b"}]
  ids, mask = render_chat(tok, conv)
  want = ([USER] + b("1+2") + [ASSISTANT], [0] * 5), (b("3") + [EOS], [1, 1]), \
         ([USER] + b("é?") + [ASSISTANT], [0] * 5), (b("<think>a</think>b") + [EOS], [1] * 18)
  assert ids == sum((w[0] for w in want), [])
  assert mask == sum((w[1] for w in want), [])


def test_template_that_rewrites_history_is_refused(tok):
  bad = Tokenizer(tok.tok, dict(tok.config, chat_template=(
      "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}")), source="bad")
  with pytest.raises(TemplateError, match="does not extend"):
    render_chat(bad, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}])


def test_pack_segments_positions_truncation():
  ex = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9, 10, 11, 12], [1] * 7), ([13], [1])]
  p = pack(ex, 6)
  assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11], [13, 0, 0, 0, 0, 0]]
  assert p.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
  assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0] * 6]
  assert p.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
  assert p.truncated == 1
  d = SFTData(p, batch_size=4, seed=1)  # more rows per batch than rows: cycles epochs
  rows = [tuple(r) for s in range(3) for r in d.batch_at(s)["tokens"].tolist()]
  assert sorted(rows[:3]) == sorted(tuple(r) for r in p.tokens.tolist())  # each row once per epoch
  assert d.batch_at(2)["tokens"].tolist() == SFTData(p, 4, 1).batch_at(2)["tokens"].tolist()


def test_sft_loss_equals_unpacked_numpy_ce(tok):
  model = random_model(CFG, seed=2)
  convs = [[{"role": "user", "content": "12+3"}, {"role": "assistant", "content": "<think>x</think>15"}],
           [{"role": "user", "content": "9-9"}, {"role": "assistant", "content": "0"}],
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "1"}, {"role": "assistant", "content": "22"}]]
  rendered = [render_chat(tok, c) for c in convs]
  packed = pack(rendered, 32)
  assert packed.tokens.shape[0] == 2  # the first two share a row: segments matter
  batch = {k: jnp.asarray(getattr(packed, k)) for k in ("tokens", "segment_ids", "positions",
                                                         "loss_mask")}
  # XLA's CPU optimisations off for these eager calls (one scan program per length, compiled,
  # not run, is the cost): the check is at a tolerance.
  with fast_compiles():
    loss, m = SFTObjective(0.0)(model, batch)
    all_logits = [np.asarray(model.forward(jnp.asarray([ids])).logits[0], np.float64)
                  for ids, _ in rendered]
  nll = []
  for (ids, mask), logits in zip(rendered, all_logits):  # each conversation alone, from position 0
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll += [-lp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]]
  assert m["tokens"] == len(nll) == sum(sum(mk[1:]) for _, mk in rendered)
  assert_close(loss, np.mean(nll), atol=1e-5, rtol=1e-5, what="masked packed CE")


def test_chat_jsonl_errors(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"prompt": "a", "completion": "b"}\n\n{"messages": [{"role": "user", "content": "x"}]}\n')
  with pytest.raises(UserError, match=r"d.jsonl:3: no assistant message"):
    read_chat_jsonl(str(p))
  p.write_text('{"prompt": "a", "completion": "b"}\n{"messages": [}\n')
  with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON"):
    read_chat_jsonl(str(p))
  p.write_text('{"prompt": "a", "completion": "b"}\n')
  assert read_chat_jsonl(str(p)) == [[{"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b"}]]


def test_distillation_generate_then_sft(tmp_path, capsys, monkeypatch):
  import functools

  from dsv3_jax.cli import main
  from dsv3_jax.inference import Generator
  from dsv3_jax.rl.policy import PolicyTrainer
  from dsv3_jax.sharding import make_mesh
  from dsv3_jax.train.optim import OptimConfig
  from dsv3_jax.train.trainer import write_run_config
  teacher = str(tmp_path / "teacher")
  one = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  pol = PolicyTrainer(random_model(CFG, seed=5), OptimConfig(total_steps=1), mesh=one,
                      out_dir=teacher)
  pol.save({}, force=True)
  pol.close()
  write_run_config(teacher, CFG)
  write_byte_tokenizer(teacher)
  # CPU optimisations off for the commands' programs (as tests/test_demo.py): compiling them, not
  # running 3 prompts x 6 tokens and 2 steps of a 1-layer model, is this test's cost.
  for cls in (Generator, PolicyTrainer):
    monkeypatch.setattr(cls, "__init__", functools.partialmethod(cls.__init__,
                                                                 compiler_options=FAST_COMPILE))
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("1+1\n2+5\n7-3\n")
  out = str(tmp_path / "distill.jsonl")
  assert main(["generate", "--checkpoint", teacher, "--prompts", str(prompts), "--chat",
               "--out", out, "--max-new-tokens", "6", "--dtype", "float32", "--temperature",
               "0.8"]) == 0
  rows = [json.loads(line) for line in open(out)]
  assert [r["prompt"] for r in rows] == ["1+1", "2+5", "7-3"]
  assert all(isinstance(r["completion"], str) and 1 <= len(r["ids"]) <= 6 for r in rows)
  student = str(tmp_path / "student")
  assert main(["sft", "--init", teacher, "--data", out, "--out", student, "--steps", "2",
               "--batch", "8", "--seq", "32", "--lr", "1e-2"]) == 0
  assert os.path.isfile(os.path.join(student, "tokenizer.json"))
  logged = [json.loads(line) for line in open(os.path.join(student, "metrics.jsonl"))]
  assert [r["step"] for r in logged] == [1, 2]
  assert logged[0]["tokens"] > 0 and os.path.isdir(os.path.join(student, "checkpoints", "2"))
  assert main(["sft", "--init", teacher, "--data", out, "--out", student, "--steps", "3",
               "--batch", "8", "--seq", "32", "--lr", "1e-2"]) == 2
  assert "--steps 3 differs" in capsys.readouterr().err

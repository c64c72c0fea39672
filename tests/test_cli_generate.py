"""`dsv3 generate`: every checkpoint / config / flag mistake is one line on stderr (exit 2, no
traceback, checked before the weights load where possible); Ctrl-C is one line (exit 130);
--debug shows the traceback; batched prompts (repeated flags, --prompt-file) give the same ids as
one prompt at a time (the oracle: separate single-prompt runs of the same command)."""
import json
import os
import shutil

import pytest

from dsv3_jax.cli import main
from dsv3_jax.errors import UserError
from tests.cli_helpers import (CFG, assert_user_error, run_cli, tiny_model, write_checkpoint,
                               write_word_tokenizer)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  path = write_checkpoint(tiny_model(0), str(root / "ckpt"))
  write_word_tokenizer(path, CFG.vocab_size)
  return path


@pytest.fixture
def ckpt(ckpt_root, tmp_path):
  """A fresh copy to break."""
  return shutil.copytree(ckpt_root, tmp_path / "ckpt")


def gen(capsys, ckpt, *extra):
  return run_cli(capsys, "generate", "--quiet", "--checkpoint", ckpt, "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "3", "--dtype", "float32", *extra)


def _edit_config(ckpt, **changes):
  p = ckpt / "config.json"
  cfg = json.loads(p.read_text())
  for k, v in changes.items():
    if v is None:
      del cfg[k]
    else:
      cfg[k] = v
  p.write_text(json.dumps(cfg))


def test_missing_config_json(capsys, ckpt):
  os.remove(ckpt / "config.json")
  assert_user_error(gen(capsys, ckpt), "generate", "config.json", str(ckpt))


def test_config_field_missing_and_wrong_type(capsys, ckpt):
  _edit_config(ckpt, hidden_size=None)
  assert_user_error(gen(capsys, ckpt), "generate", "config.json", "missing field 'hidden_size'")
  _edit_config(ckpt, hidden_size="64")
  assert_user_error(gen(capsys, ckpt), "generate", "config.json", "'hidden_size'",
                    "must be an integer", "'64' (str)")


def test_malformed_config_json_names_file_and_line(capsys, ckpt):
  (ckpt / "config.json").write_text('{\n  "vocab_size": 256,\n  "hidden_size": 64,,\n}')
  assert_user_error(gen(capsys, ckpt), "generate", "config.json", "malformed JSON", "line 3")


def test_truncated_shard(capsys, ckpt):
  shard = sorted(ckpt.glob("model-*.safetensors"))[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  assert_user_error(gen(capsys, ckpt), "generate", shard.name, "truncated")


def test_missing_shard(capsys, ckpt):
  shard = sorted(ckpt.glob("model-*.safetensors"))[0]
  os.remove(shard)
  assert_user_error(gen(capsys, ckpt), "generate", shard.name, "missing")


def test_shape_mismatch_names_the_tensor(capsys, ckpt):
  _edit_config(ckpt, moe_intermediate_size=CFG.moe_intermediate_size * 2)
  assert_user_error(gen(capsys, ckpt), "generate", "experts", "shape")


def test_damaged_orbax_tree(capsys, ckpt, tmp_path):
  conv = tmp_path / "conv"
  assert run_cli(capsys, "convert", "--quiet", ckpt, conv)[0] == 0
  shutil.rmtree(conv / "params" / "state" / "d")  # the array data: an incomplete copy
  assert_user_error(gen(capsys, conv), "generate", str(conv / "params"), "cannot restore")


def test_pallas_on_cpu_rejected_before_loading(capsys, ckpt):
  res = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt-ids", "5", "--kernels", "pallas")
  assert_user_error(res, "generate", "--kernels pallas", "cpu")


def test_prompt_too_long_checked_before_loading(capsys, ckpt):
  ids = ",".join(["5"] * 500)
  res = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt-ids", ids,
                "--max-new-tokens", "20")
  assert "loading" not in res[2]  # no status line: nothing was loaded
  assert_user_error(res, "generate", "500 tokens", "max_position_embeddings=512")


def test_out_of_vocab_prompt_and_chat_without_template(capsys, ckpt):
  assert_user_error(gen(capsys, ckpt, "--prompt-ids", "5,300"), "generate", "[0, 256)", "300")
  res = run_cli(capsys, "generate", "--quiet", "--checkpoint", ckpt, "--prompt", "w5", "--chat")
  assert_user_error(res, "generate", "chat_template")


def test_debug_shows_the_traceback(ckpt):
  os.remove(ckpt / "config.json")
  with pytest.raises(UserError, match="config.json"):
    main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "5", "--debug"])


def test_a_bug_is_not_turned_into_one_line(monkeypatch, ckpt):
  """Only UserError is a user error: a ValueError from inside (a bug) keeps its traceback."""
  import dsv3_jax.pretrained

  def broken(*a, **k):
    raise ValueError("internal bug")
  monkeypatch.setattr(dsv3_jax.pretrained, "from_pretrained", broken)
  with pytest.raises(ValueError, match="internal bug"):
    main(["generate", "--quiet", "--checkpoint", str(ckpt), "--prompt-ids", "5"])


def test_ctrl_c_is_one_line(monkeypatch, capsys, ckpt):
  import dsv3_jax.pretrained

  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(dsv3_jax.pretrained, "from_pretrained", interrupted)
  assert_user_error(gen(capsys, ckpt), "generate", status=130)


def test_batched_prompt_file_matches_single_prompts(capsys, tmp_path):
  """Oracle: each prompt alone, greedy by argmax of the full forward (no cache), fp32. One
  dense layer, no MTP: the least to compile."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from dsv3_jax.inference import Tokenizer
  from dsv3_jax.pretrained import from_pretrained
  small = CFG.replace(num_hidden_layers=1, num_nextn_predict_layers=0)
  ckpt = write_checkpoint(tiny_model(0, small), str(tmp_path / "small"), shards=False)
  write_word_tokenizer(ckpt, small.vocab_size)
  prompts = ["w5 w6 w7", "w9 w10 w11 w12 w13 w14", "w40"]
  pf = tmp_path / "prompts.txt"
  pf.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
  rc, out, _ = run_cli(capsys, "generate", "--quiet", "--checkpoint", ckpt, "--prompt-file", pf,
                       "--max-new-tokens", "4", "--dtype", "float32", "--eos-id", "-1")
  assert rc == 0
  rows = [json.loads(l) for l in out.splitlines()]
  tok = Tokenizer.from_dir(ckpt)
  model = from_pretrained(ckpt, jnp.float32)
  fwd = nnx.jit(lambda m, t: m.forward(t).logits)
  single = []
  for p in prompts:
    ids, new = tok.encode(p), []
    for _ in range(4):
      t = np.zeros((1, 16), np.int32)
      t[0, :len(ids)] = ids
      new.append(int(np.argmax(np.asarray(fwd(model, jnp.asarray(t)))[0, len(ids) - 1])))
      ids = ids + new[-1:]
    single.append(new)
  assert [r["prompt"] for r in rows] == prompts
  assert [r["ids"] for r in rows] == single
  assert [r["completion"] for r in rows] == [tok.decode(t) for t in single]


def test_prompt_file_formats(tmp_path):
  from dsv3_jax.inference.cli import read_prompt_file
  jf = tmp_path / "p.jsonl"
  jf.write_text('{"prompt": "a b"}\n\n"c\\nd"\n')
  assert read_prompt_file(str(jf)) == ["a b", "c\nd"]
  jf.write_text('{"prompt": "a b"}\n{"prompt": 3}\n')
  with pytest.raises(UserError, match="line 2"):
    read_prompt_file(str(jf))


def test_empty_prompt_file(capsys, ckpt, tmp_path):
  pf = tmp_path / "empty.txt"
  pf.write_text("\n\n")
  res = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt-file", pf)
  assert_user_error(res, "generate", str(pf), "no prompts")

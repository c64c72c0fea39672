"""`dsv3 train`: data, flag and resume mistakes are one line on stderr (exit 2, no traceback) and
are found before --out is created; Ctrl-C saves the last logged step and says how to resume."""
import json

import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.train.data import DataError, check_token_files, write_tokens
from tests.cli_helpers import assert_user_error, run_cli

COMMON = ["--config", "tiny", "--batch", "2", "--seq", "32", "--quiet"]
SMALL = dsv3_jax.TINY.replace(num_hidden_layers=1, num_nextn_predict_layers=0)


def train(capsys, out, *extra):
  return run_cli(capsys, "train", *COMMON, "--out", out, *extra)


def _tokens(n=4000, vocab=256, seed=0):
  return np.random.RandomState(seed).randint(1, vocab, n)


@pytest.mark.parametrize("name,content,needles", [
    ("corpus.txt", b"Once upon a time there was a cat.\n" * 50, ["corpus.txt", "not a token file", "dsv3 tokenize"]),
    ("corpus.bin", b"Once upon a time there was a cat.\n" * 50, ["corpus.bin", "looks like text"]),
    ("empty.u32", b"", ["empty.u32", "is empty"]),
    ("odd.u32", b"\x01\x00\x00", ["odd.u32", "not a whole number"]),
])
def test_bad_token_files(capsys, tmp_path, name, content, needles):
  (tmp_path / name).write_bytes(content)
  out = tmp_path / "run"
  assert_user_error(train(capsys, out, "--data", tmp_path / name), "train", *needles)
  assert not out.exists()


def test_missing_file_and_out_of_vocab_ids_create_nothing(capsys, tmp_path):
  out = tmp_path / "run"
  assert_user_error(train(capsys, out, "--data", tmp_path / "nope.u32"), "train", "nope.u32",
                    "does not exist")
  ids = _tokens()
  ids[1234] = 300
  write_tokens(tmp_path / "t.u32", ids)
  assert_user_error(train(capsys, out, "--data", tmp_path / "t.u32"), "train", "t.u32",
                    "token id 300 at position 1234", "[0, 256)")
  assert not out.exists()


def test_uint16_refused_for_a_large_vocabulary(capsys, tmp_path):
  big = tmp_path / "config.json"
  big.write_text(json.dumps(dsv3_jax.TINY.replace(vocab_size=70000).to_hf_config()))
  write_tokens(tmp_path / "t.bin", _tokens())  # .bin: uint16
  res = run_cli(capsys, "train", "--config", big, "--data", tmp_path / "t.bin", "--out",
                tmp_path / "run")
  assert_user_error(res, "train", "t.bin", "uint16", "vocab_size 70000", ".u32")
  # a uint32 file of the same ids passes the check; its ids are read back exactly
  write_tokens(tmp_path / "t.u32", _tokens() + 65000)
  assert check_token_files([tmp_path / "t.u32"], 70000) == [4000]
  assert np.array_equal(np.fromfile(tmp_path / "t.u32", "<u4"), _tokens() + 65000)
  with pytest.raises(DataError, match="cannot hold"):
    check_token_files([tmp_path / "t.bin"], 70000)


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--lr", "-1"), ("--batch", "0"),
                                        ("--seq", "1"), ("--save-every", "0"), ("--warmup", "-2"),
                                        ("--ep-capacity-factor", "0")])
def test_flags_out_of_range(capsys, tmp_path, flag, value):
  res = train(capsys, tmp_path / "run", flag, value)
  msg = assert_user_error(res, "train", flag, value)
  assert "OptimConfig" not in msg and not (tmp_path / "run").exists()


def test_seq_beyond_max_positions(capsys, tmp_path):
  res = run_cli(capsys, "train", "--config", "tiny", "--seq", "1024", "--out", tmp_path / "run")
  assert_user_error(res, "train", "--seq 1024", "max_position_embeddings=512")


def test_unknown_config(capsys, tmp_path):
  res = run_cli(capsys, "train", "--config", "nano", "--out", tmp_path / "run")
  assert_user_error(res, "train", "--config 'nano'", "tiny")


def test_ctrl_c_saves_then_resume_checks_config_and_schedule(capsys, tmp_path, monkeypatch):
  import functools

  from dsv3_jax.train.trainer import Trainer
  from tests.sharding_case import FAST_COMPILE
  out = tmp_path / "run"
  real_step = Trainer.train_step
  # CPU optimisations off: compile time dominates this test, not the two steps
  monkeypatch.setattr(Trainer, "__init__", functools.partialmethod(Trainer.__init__,
                                                                   compiler_options=FAST_COMPILE))

  def step_then_interrupt(self, batch):
    if self.step == 1:  # Ctrl-C while step 2 runs: step 1 was logged
      raise KeyboardInterrupt
    return real_step(self, batch)
  monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
  # one dense layer, no MTP: the least to compile
  small = tmp_path / "small.json"
  small.write_text(json.dumps(SMALL.to_hf_config()))
  args = ["--config", small, "--batch", "2", "--seq", "32", "--quiet", "--out", out]
  res = run_cli(capsys, "train", *args, "--steps", "4", "--save-every", "100")
  msg = assert_user_error(res, "train", "saved step 1", "rerun the same command", status=130)
  assert str(out / "checkpoints") in msg
  assert (out / "checkpoints" / "1").is_dir()
  assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
  monkeypatch.undo()
  # another config: refused before the checkpoint is touched
  other = tmp_path / "other.json"
  other.write_text(json.dumps(SMALL.replace(hidden_size=32).to_hf_config()))
  res = run_cli(capsys, "train", "--config", other, "--batch", "2", "--seq", "32", "--out", out,
                "--steps", "4")
  assert_user_error(res, "train", "--config differs", "hidden_size: 64 there, 32 now")
  # another schedule length: refused unless asked for
  res = run_cli(capsys, "train", *args, "--steps", "6", "--save-every", "100")
  assert_user_error(res, "train", "--steps 4 -> 6", "--allow-schedule-change")


def test_every_train_option_has_help_and_shows_its_default():
  from dsv3_jax.cli import build_parser
  parser = build_parser("train")
  sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
  text = sub.format_help()
  for action in sub._actions:
    if action.option_strings:
      assert action.help, action.option_strings
  assert "--steps STEPS         total optimizer steps of the run (default: 200)" in text
  assert "(default: None)" not in text

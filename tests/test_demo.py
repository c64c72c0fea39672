"""`dsv3 demo` (the README's first command) end to end, with a short training part."""
import re

import pytest

from dsv3_jax.cli import main as dsv3_main
from tests.utils import fast_compiles


@pytest.mark.slow
def test_demo_runs_trains_saves_and_generates(tmp_path, capsys):
  # XLA's CPU optimisations off for every program the demo compiles (its eager init and
  # forward, the training and generation steps): compiling them, not running 8 steps and
  # 2 x 80 tokens of the tiny model, is what this test spends its time on. Its checks are at
  # tolerance (1e-5, a loss drop of 1.0) or compare stored values (the restore diff of 0).
  out = tmp_path / "demo"
  # A time budget far past 8 steps: the test checks the 8 steps, not this host's speed.
  with fast_compiles():
    assert dsv3_main(["demo", "--skip-671b", "--train-steps", "8", "--train-seconds", "1200",
                      "--out", str(out)]) == 0
  text = capsys.readouterr().out
  # the saved tiny checkpoint loads back to the same logits (eager vs jitted fp32)
  diff = float(re.search(r"vs the original \(eager\): max abs diff (\S+)", text).group(1))
  assert diff < 1e-5
  ckpt = out / "tiny-deepseek-v3"
  assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
  losses = [float(x) for x in re.findall(r"step +\d+ +loss (\S+)", text)]
  assert len(losses) == 8 and losses[-1] < losses[0] - 1.0  # 7.25 -> ~5.6 in 8 steps
  train = out / "train"  # everything under --out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
  assert (train / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert (train / "checkpoints" / "8").is_dir()
  # generation runs from the checkpoint restored from disk, which holds exactly the trained weights
  assert re.search(r"restored step 8 from .* \(max abs diff to the trained weights 0\.0e\+00\)", text)
  assert "plain greedy" in text and "speculative greedy" in text and "MTP acceptance" in text

"""bench/compile_breakdown.py on a hand-made libtpu log + LLO dump (names, mtimes and sizes known)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compile_breakdown as cb  # noqa: E402

HLO = """\
ENTRY %main {
  %fusion.1 = bf16[8,128]{1,0} fusion(%p), kind=kLoop, calls=%f1, metadata={op_name="jit(_train_step)/jvp(layers_3_60)/while/body/closed_call/moe/expert_parallel/shard_map/gather"}
  %sort.2 = (s32[16]{0}, pred[16]{0}) sort(%a, %b), dimensions={0}, to_apply=%cmp
  %copy.3 = f32[4,4]{0,1} copy(%c), metadata={op_name="jit(_train_step)/transpose(jvp(jvp()))/checkpoint/mla/dot_general"}
}
"""


def _file(d, start_ns, op, stage, end_ns, size):
  path = os.path.join(d, f"{start_ns}-{op}-{stage}.txt")
  with open(path, "w") as f:
    f.write("x" * size)
  os.utime(path, ns=(end_ns, end_ns))


def test_ops_stages_and_grouping(tmp_path, capsys):
  dump, logs = tmp_path / "dump", tmp_path / "logs"
  dump.mkdir()
  logs.mkdir()
  (dump / "100-TLP-hlo.txt").write_text(HLO)
  s = 10**18
  # op start = file-name prefix, end = the latest mtime of its files, code = final bundles bytes
  _file(dump, s, "fusion.1", "00-schedule-analysis_final_bundles", s + 2 * 10**9, 7)
  _file(dump, s, "fusion.1", "01-final_bundles", s + 3 * 10**9, 300)
  _file(dump, s + 10**9, "sort.2", "01-final_bundles", s + 2 * 10**9, 100)
  _file(dump, s + 10**9, "copy.3", "01-final_bundles", s + 7 * 10**9, 600)
  _file(dump, s, "TLP", "01-final_bundles", s + 9 * 10**9, 50)  # the program itself: skipped
  got = sorted(cb.ops(str(dump)))
  assert got == [("copy.3", 6.0, 600), ("fusion.1", 3.0, 300), ("sort.2", 1.0, 100)]
  meta = cb.hlo_meta(str(dump))
  assert meta["sort.2"] == ("sort", "") and meta["fusion.1"][0] == "fusion"
  assert cb.origin(meta["fusion.1"][1]) == "stack layers 3-60: MoE exchange + experts"
  assert cb.origin(meta["copy.3"][1]) == "MTP block: attention (backward)"
  assert cb.origin("") == "no op_name (SPMD partitioner / layout copies)"
  (logs / "tpu_driver.vm.root.log.INFO.1").write_text(
      "I1130 16:54:17.79 1 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 4m3s\n"
      "I1130 16:54:17.80 1 compilation_stats.cc:136] layout-assignment, 1, 65288.1\n"
      "I1130 16:54:17.80 1 compilation_stats.cc:136] cse, 40, 7715.2\n")
  lines, passes = cb.stages(str(logs))
  assert lines == ["HLO_PASSES stage duration: 4m3s"]
  assert passes == [("layout-assignment", 65288.1), ("cse", 7715.2)]
  cb.main(str(logs), str(dump))
  out = capsys.readouterr().out
  assert "3 distinct ops, per-op wall seconds summed 10" in out
  assert "60.0% of time  60.0% of code     1 ops  MTP block" in out  # copy.3: 6 of 10 s, 600 of 1000 B

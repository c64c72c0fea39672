"""Few-token vocab ops (`sharding.few_token_logits` / `few_token_lookup`: a decode step's LM head
and embedding lookup) on 8 simulated CPU devices against numpy (float64 oracle): forward and
gradients, for meshes where the table is split over vocab only, over vocab and hidden, and over
hidden with the vocab on a non-batch axis; and their compiled HLO moves no table-sized data.
Tolerance: float32 with matmul precision "highest", values O(1): 1e-5 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from dsv3_jax.sharding import ShardingRules, logical_to_spec, make_mesh, use_rules
from tests.utils import hlo_collectives
from dsv3_jax.sharding.gather import few_token_logits, few_token_lookup
from tests.utils import assert_close

B, T, D, V = 8, 1, 16, 64
VOCAB_HIDDEN_BATCH = (1536, 256, 4)
CASES = [({"expert": 8}, ShardingRules(vocab="expert")),                 # serve: vocab = batch axis
         ({"fsdp": 2, "expert": 4}, ShardingRules(vocab="expert")),      # + hidden split (psum)
         ({"data": 2, "fsdp": 2, "tensor": 2}, ShardingRules()),          # vocab on tensor
         ({"fsdp": 2, "expert": 2, "tensor": 2}, ShardingRules())]        # hidden on a major axis


def _put(a, logical, mesh, rules):
  return jax.device_put(a, NamedSharding(mesh, logical_to_spec(logical, rules, mesh, a.shape)))


@pytest.mark.parametrize("shape,rules", CASES)
def test_few_token_vocab_ops_match_numpy(shape, rules):
  """Logits x @ w and lookup table[t] (and d/dx, d/dw of sum(sin(.)) ) equal the numpy oracle;
  the compiled programs hold no all-gather / all-reduce of a table's size (only B*T*D-sized
  activations and the [B, T, V/v] logits move)."""
  r = np.random.default_rng(0)
  x = r.standard_normal((B, T, D)).astype(np.float32)
  w = (0.3 * r.standard_normal((D, V))).astype(np.float32)
  table = r.standard_normal((V, D)).astype(np.float32)
  tok = r.integers(0, V, (B, T)).astype(np.int32)
  mesh = make_mesh(shape)
  with jax.set_mesh(mesh), use_rules(rules), jax.default_matmul_precision("highest"):
    xs, ws = _put(x, ("batch",), mesh, rules), _put(w, ("embed", "vocab"), mesh, rules)
    ts, tbs = _put(tok, ("batch",), mesh, rules), _put(table, ("vocab", "embed"), mesh, rules)
    head = lambda x, w: few_token_logits(x, w, ("embed", "vocab"), jnp.float32)
    look = lambda t, tb: few_token_lookup(t, tb, ("vocab", "embed"), jnp.float32)
    head_step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(head(x, w))), (0, 1)))
    look_step = jax.jit(jax.value_and_grad(lambda t, tb: jnp.sum(jnp.sin(look(t, tb))), 1))
    logits, rows = jax.jit(head)(xs, ws), jax.jit(look)(ts, tbs)
    (_, (gx, gw)), (_, gt) = head_step(xs, ws), look_step(ts, tbs)
    hlos = [jax.jit(f).lower(*a).compile().as_text()
            for f, a in ((head, (xs, ws)), (look, (ts, tbs)))]
  ref = x.astype(np.float64) @ w
  assert_close(logits, ref, atol=1e-5, what="logits")
  with jax.set_mesh(mesh), use_rules(rules), jax.default_matmul_precision("highest"):
    last = jax.jit(head)(_put(x[:, -1], ("batch",), mesh, rules), ws)  # [B, D]: a prefill's
  assert_close(last, ref[:, -1], atol=1e-5, what="logits of [B, D]")
  assert_close(gx, np.cos(ref) @ w.T, atol=1e-5, what="d logits / dx")
  assert_close(gw, np.einsum("btd,btv->dv", x, np.cos(ref)), atol=1e-5, what="d logits / dw")
  assert_close(rows, table[tok], atol=0, what="lookup")
  g_table = np.zeros_like(table, np.float64)
  np.add.at(g_table, tok.reshape(-1), np.cos(table[tok]).reshape(-1, D))
  assert_close(gt, g_table, atol=1e-5, what="d lookup / d table")
  for hlo in hlos:
    colls = hlo_collectives(hlo, ops=("all-gather", "all-reduce", "all-to-all"))
    assert colls, "expected the activations' gather"
    for op, shapes, _ in colls:
      for _, dims in shapes:
        assert int(np.prod(dims)) < V * D // 2, f"table-sized {op} {shapes}"


def decode_step_hlo(vocab: int, hidden: int, batch: int, context: int = 256) -> str:
  """The compiled HLO text of a decode step of a reduced config on v5p:2x2x1, mesh expert=4,
  the pod rules (`plan.POD_RULES`: vocab and batch both on `expert`), the logits returned split
  over the batch as `dsv3 plan` and the generator ask."""
  from flax import nnx
  from jax.experimental import topologies

  import dsv3_jax
  from dsv3_jax.inference import abstract_decode_step
  from dsv3_jax.plan import POD_RULES
  from dsv3_jax.sharding import state_shardings
  from tests.test_plan import small_config

  cfg = small_config(vocab_size=vocab, hidden_size=hidden)
  topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  mesh, rules = make_mesh({"expert": 4}, devices=topo.devices), POD_RULES
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  graphdef, params, rest = nnx.split(dsv3_jax.abstract_model(cfg, rt), nnx.Param, ...)
  sds = lambda tree, sh: jax.tree.map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  pa, ra = (sds(t, state_shardings(t, rules, mesh)) for t in (params, rest))
  step, args, out_shardings = abstract_decode_step(graphdef, pa, ra, rules, mesh, batch, context)
  with jax.set_mesh(mesh), use_rules(rules), jax.default_matmul_precision("default"):
    return jax.jit(step, donate_argnums=(3,), out_shardings=out_shardings).trace(
        *args).lower().compile().as_text()


def test_tpu_decode_step_moves_no_vocab_table():
  """A decode step (one token per sequence, one sequence per device), compiled for TPU by
  libtpu: no collective moves an embedding / LM-head shard or more (GSPMD used to all-reduce the
  whole [D, V] head, rebuilt by every device). Oracle: the table's sizes; the logits [B, 1, V]
  and the B x D activations are what may move."""
  pytest.importorskip("libtpu", reason="TPU AOT compilation needs libtpu (the test extra)")
  vocab, hidden, batch = VOCAB_HIDDEN_BATCH
  hlo = decode_step_hlo(vocab, hidden, batch)
  shard = hidden * vocab // 4
  colls = hlo_collectives(hlo, ops=("all-gather", "all-reduce", "all-to-all",
                                       "collective-permute", "reduce-scatter"))
  assert colls
  big = [(op, shapes) for op, shapes, _ in colls for _, dims in shapes
         if int(np.prod(dims)) >= shard and {vocab, vocab // 4} & set(dims)]
  assert not big, big

"""Mesh construction, logical-axis rules, shard_map expert parallelism, memory planning.

Imports nothing from the model (the model imports `expert_parallel` for its MoE dispatch and
`kernel_map` to run each Pallas kernel per shard).
"""
from dsv3_jax.sharding.mesh import (DATA, EXPERT, FSDP, TENSOR, TPU_COMPILE_OPTIONS,
                                    TPU_TRAIN_COMPILE_OPTIONS,
                                    DistributedConfig, add_distributed_arguments,
                                    compile_options_for, initialize_distributed, make_mesh,
                                    parse_mesh_shape)
from dsv3_jax.sharding.rules import (POD_RULES, SERVE_POD_RULES, ShardingRules, activation_sharding,
                                     init_sharded, rules_for_mesh, logical_to_spec, shard_model, state_shardings, state_specs,
                                     variable_spec, use_rules, current_rules, wide_expert)
from dsv3_jax.sharding.gather import few_token_logits, few_token_lookup, with_whole_weight
from dsv3_jax.sharding.expert_parallel import EPLayout, Exchange, ep_layout, expert_parallel_ffn
from dsv3_jax.sharding.kernel_map import Dim, KernelShardingError, kernel_map, kernel_specs
from dsv3_jax.sharding.entry import (MemoryBudgetError, add_mesh_arguments, check_fits,
                                     default_mesh, global_batch, mesh_from_args, process_rows,
                                     resolve_mesh, start_distributed, cli_mesh,
                                     sharded_nbytes, to_host, tree_shardings, variable_sharding)

__all__ = [
    "DATA", "FSDP", "EXPERT", "TENSOR", "make_mesh", "parse_mesh_shape", "DistributedConfig",
    "add_distributed_arguments", "initialize_distributed", "TPU_COMPILE_OPTIONS",
    "TPU_TRAIN_COMPILE_OPTIONS",
    "compile_options_for", "ShardingRules", "logical_to_spec",
    "variable_spec", "state_specs", "state_shardings", "shard_model", "init_sharded",
    "activation_sharding", "Exchange", "EPLayout", "ep_layout", "expert_parallel_ffn",
    "kernel_map", "kernel_specs", "Dim", "KernelShardingError",
    "default_mesh", "resolve_mesh", "tree_shardings", "variable_sharding", "global_batch", "process_rows",
    "to_host", "sharded_nbytes", "check_fits", "MemoryBudgetError", "add_mesh_arguments",
    "mesh_from_args", "start_distributed", "cli_mesh", "use_rules", "current_rules", "wide_expert",
    "POD_RULES", "SERVE_POD_RULES", "rules_for_mesh",
    "with_whole_weight",
    "few_token_logits", "few_token_lookup",
]

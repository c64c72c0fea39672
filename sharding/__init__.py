"""Mesh construction, logical-axis rules and shard_map expert parallelism."""

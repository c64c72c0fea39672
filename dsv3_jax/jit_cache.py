"""Bounded caches of jitted functions, shared by the objects that build them (Generators,
Trainers) so that a second object with the same model, mesh and shapes does not compile again.

The caches are explicit module objects (`generate.COMPILED`, the trainer's `STEPS` and `INITS`):
bounded, keyed by everything the compiled function depends on, and clearable.
"""
from __future__ import annotations

import collections

import jax

__all__ = ["CompiledCache", "sharding_key"]


class CompiledCache:
  """A bounded least-recently-used map from a compile key to a jitted or compiled function.

  Keys must name everything the function depends on (model structure, mesh, rules, shardings,
  statics, shapes, compiler options); at most `max_entries` stay alive (each holds its
  executable); `clear()` drops all."""

  def __init__(self, max_entries: int = 32):
    self.max_entries = max_entries
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._entries)

  def items(self):
    """(key, compiled) pairs, least recently used first."""
    return list(self._entries.items())

  def get(self, key):
    """The entry for `key` (now the most recently used), or None."""
    if key not in self._entries:
      return None
    self._entries.move_to_end(key)
    return self._entries[key]

  def get_or_make(self, key, make):
    """The entry for `key`, made by `make()` (and kept) when absent."""
    value = self.get(key)
    if value is None:
      value = make()
      self.put(key, value)
    return value

  def put(self, key, value) -> None:
    self._entries[key] = value
    self._entries.move_to_end(key)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)

  def clear(self) -> None:
    self._entries.clear()


def sharding_key(tree):
  """A hashable key of a pytree of NamedShardings (its structure and leaves)."""
  return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))

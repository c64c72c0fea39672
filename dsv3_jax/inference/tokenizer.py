"""The checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, plus the special
tokens and chat template of tokenizer_config.json when present.

Encoding never lets tokenizer.json's post-processor add special tokens; the BOS token is added
here when tokenizer_config.json says `add_bos_token` (DeepSeek's does). A chat template already
writes its own BOS, so `encode_chat` adds none. Chat templates are rendered with jinja2 (a
dependency of the package). Problems with the files raise `TokenizerError` (a `UserError`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dsv3_jax.errors import UserError

__all__ = ["Tokenizer", "TokenizerError"]


class TokenizerError(ValueError, UserError):
  """tokenizer.json / tokenizer_config.json is missing, malformed or inconsistent, or its chat
  template fails (the message names the file)."""


def _token_text(v: Any) -> str | None:
  """tokenizer_config.json holds special tokens as strings or as {"content": ...} objects."""
  if isinstance(v, dict):
    return v.get("content")
  return v


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` with the checkpoint's special tokens and chat template."""

  def __init__(self, tokenizer, config: dict[str, Any] | None = None, *, source: str = "<memory>"):
    self.tok = tokenizer
    self.config = dict(config or {})
    self.source = source
    self.bos_token = _token_text(self.config.get("bos_token"))
    self.eos_token = _token_text(self.config.get("eos_token"))
    self.bos_token_id = self._id(self.bos_token)
    self.eos_token_id = self._id(self.eos_token)
    self.add_bos_token = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
    self.chat_template = self.config.get("chat_template")

  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    i = self.tok.token_to_id(token)
    if i is None:
      raise TokenizerError(f"{self.source}: special token {token!r} from tokenizer_config.json is not "
                       f"in the vocabulary of tokenizer.json")
    return i

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads <path>/tokenizer.json and, when present, <path>/tokenizer_config.json."""
    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
      raise FileNotFoundError(f"no tokenizer.json in {path}")
    try:
      import tokenizers
    except ImportError as e:
      raise TokenizerError("loading tokenizer.json needs the `tokenizers` package "
                           "(pip install tokenizers)") from e
    try:
      tok = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # the library raises a bare Exception on malformed files
      raise TokenizerError(f"{tj}: not a valid tokenizer.json ({e})") from e
    config = None
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
      with open(tc, encoding="utf-8") as f:
        try:
          config = json.load(f)
        except json.JSONDecodeError as e:
          raise TokenizerError(f"{tc}: invalid JSON ({e})") from e
    return cls(tok, config, source=path)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """text -> ids, with BOS first when tokenizer_config.json asks (or `add_bos` says)."""
    ids = self.tok.encode(text, add_special_tokens=False).ids
    if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
      ids = [self.bos_token_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    """Renders [{"role": ..., "content": ...}, ...] with tokenizer_config.json's chat_template."""
    if not self.chat_template:
      raise TokenizerError(f"{self.source}: no chat_template in tokenizer_config.json (--chat)")
    try:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
      raise TokenizerError("rendering the chat template needs jinja2 (pip install jinja2), or "
                           "pass the prompt without the chat template") from e

    def raise_exception(msg):
      raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = self.chat_template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t["template"] for t in template if t.get("name") == "default"),
                      template[0]["template"])
    try:
      return env.from_string(template).render(
          messages=messages, add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    except jinja2.TemplateError as e:
      raise TokenizerError(f"{self.source}: the chat template of tokenizer_config.json failed: "
                           f"{e}") from e

  def encode_chat(self, prompt: str) -> list[int]:
    """One user turn through the chat template, ready for the assistant's reply."""
    return self.encode(self.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)

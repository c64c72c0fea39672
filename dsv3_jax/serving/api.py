"""OpenAI request parsing and response bodies for `server.py` (no web framework here).

Every malformed request raises `ApiError` (HTTP 400, OpenAI's error body) naming the field;
the server never answers a client mistake with a 500.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from dsv3_jax.serving.request import RequestParams

__all__ = ["ApiError", "error_body", "parse_completion", "parse_chat", "completion_body",
           "chat_body", "completion_chunk", "chat_chunk", "TextStream"]


class ApiError(Exception):
  """A client mistake: status (400, 401, 404, 503) and an OpenAI-style error body."""

  def __init__(self, message: str, *, param: str | None = None, status: int = 400,
               type: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _get(body: dict, name: str, kinds, default, what: str):
  """body[name] checked against `kinds` (a type or tuple; bool is never an int or a float)."""
  v = body.get(name, default)
  if v is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if isinstance(v, bool) and bool not in kinds:
    raise ApiError(f"'{name}' must be {what}, got {v!r}", param=name)
  if not isinstance(v, kinds):
    raise ApiError(f"'{name}' must be {what}, got {type(v).__name__}", param=name)
  return v


def _params(body: dict, max_tokens_default: int | None, room: int) -> RequestParams:
  """The sampling fields; max_tokens defaults to `max_tokens_default`, or (None) to `room`,
  what the context has left after the prompt."""
  n = _get(body, "n", int, 1, "an integer")
  if n != 1:
    raise ApiError(f"'n' must be 1 (one choice per prompt), got {n}", param="n")
  max_tokens = _get(body, "max_tokens", int, None, "an integer")
  if max_tokens is None:
    max_tokens = _get(body, "max_completion_tokens", int, max_tokens_default, "an integer")
  if max_tokens is not None and max_tokens <= 0:
    raise ApiError(f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
  temperature = float(_get(body, "temperature", (int, float), 1.0, "a number"))
  if temperature < 0:
    raise ApiError(f"'temperature' must be >= 0, got {temperature}", param="temperature")
  top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
  if not 0 < top_p <= 1:
    raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
  top_k = _get(body, "top_k", int, 0, "an integer")
  if top_k < 0:
    raise ApiError(f"'top_k' must be >= 0 (0 = off), got {top_k}", param="top_k")
  seed = _get(body, "seed", int, None, "an integer")
  stop = _get(body, "stop", (str, list), None, "a string or a list of strings")
  stop = [stop] if isinstance(stop, str) else (stop or [])
  if not all(isinstance(s, str) and s for s in stop):
    raise ApiError("'stop' must be a non-empty string or a list of them", param="stop")
  stop_ids = _get(body, "stop_token_ids", list, [], "a list of token ids")
  if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
    raise ApiError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
  ignore_eos = _get(body, "ignore_eos", bool, False, "a boolean")
  for flag in ("echo", "logprobs"):
    if body.get(flag) not in (None, False, 0):
      raise ApiError(f"'{flag}' is not supported by this server", param=flag)
  return RequestParams(max_tokens=max_tokens if max_tokens is not None else max(room, 1),
                       temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=None if seed is None else seed % (2**31),
                       stop_ids=tuple(stop_ids), stop=tuple(stop), ignore_eos=ignore_eos)


def _model(body: dict, served: str) -> str:
  model = _get(body, "model", str, served, "a string")
  if model != served:
    raise ApiError(f"model '{model}' does not exist: this server serves '{served}'",
                   param="model", code="model_not_found")
  return model


def parse_completion(body: Any, *, served: str, tokenizer, max_context: int):
  """/v1/completions body -> (model, [prompt ids, ...], RequestParams, stream). `prompt`: a
  string, a list of token ids, or a list of either (one choice each)."""
  if not isinstance(body, dict):
    raise ApiError("the request body must be a JSON object")
  model = _model(body, served)
  prompt = body.get("prompt")
  if prompt is None:
    raise ApiError("'prompt' is required", param="prompt")
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
      isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    prompts = prompt
  else:
    raise ApiError("'prompt' must be a string, a list of token ids, or a non-empty list of "
                   "those", param="prompt")
  ids = []
  for p in prompts:
    if isinstance(p, str):
      if tokenizer is None:
        raise ApiError("this checkpoint has no tokenizer: send 'prompt' as token ids",
                       param="prompt")
      ids.append(tokenizer.encode(p))
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      ids.append(list(p))
    else:
      raise ApiError("'prompt' token lists must hold integers", param="prompt")
  params = _params(body, 16, max_context)
  return model, ids, params, _get(body, "stream", bool, False, "a boolean")


def parse_chat(body: Any, *, served: str, tokenizer, max_context: int):
  """/v1/chat/completions body -> (model, prompt ids, RequestParams, stream); the messages go
  through the checkpoint's chat template."""
  if not isinstance(body, dict):
    raise ApiError("the request body must be a JSON object")
  model = _model(body, served)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError("'messages' must be a non-empty list", param="messages")
  for m in messages:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise ApiError("each message must be {\"role\": string, \"content\": string}",
                     param="messages")
  if tokenizer is None:
    raise ApiError("this checkpoint has no tokenizer (chat needs one): use /v1/completions "
                   "with token ids", param="messages")
  from dsv3_jax.inference.tokenizer import TokenizerError
  try:
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]}
                                          for m in messages])
  except TokenizerError as e:
    raise ApiError(str(e), param="messages") from None
  ids = tokenizer.encode(text, add_bos=False)
  params = _params(body, None, max_context - len(ids))
  return model, ids, params, \
      _get(body, "stream", bool, False, "a boolean")


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
  """choices: [{"text", "token_ids", "finish_reason"}] in prompt order."""
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": i, "text": c["text"], "token_ids": c["token_ids"],
                       "logprobs": None, "finish_reason": c["finish_reason"]}
                      for i, c in enumerate(choices)],
          "usage": _usage(prompt_tokens, sum(len(c["token_ids"]) for c in choices))}


def chat_body(rid: str, model: str, text: str, ids: list[int], reason: str,
              prompt_tokens: int) -> dict:
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "token_ids": ids, "logprobs": None, "finish_reason": reason}],
          "usage": _usage(prompt_tokens, len(ids))}


def completion_chunk(rid: str, model: str, index: int, text: str, ids: list[int],
                     reason: str | None) -> dict:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": index, "text": text, "token_ids": ids, "logprobs": None,
                       "finish_reason": reason}]}


def chat_chunk(rid: str, model: str, delta: dict, ids: list[int], reason: str | None) -> dict:
  return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
          "model": model, "choices": [{"index": 0, "delta": delta, "token_ids": ids,
                                       "logprobs": None, "finish_reason": reason}]}


class TextStream:
  """Incremental text of a growing id list: `push(ids)` returns the new text that is safe to
  send (no half UTF-8 character; nothing that could still become a stop string), `final()` the
  rest, cut at the first stop string. Without a tokenizer all text is ""."""

  def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
    self.tokenizer, self.stop = tokenizer, stop
    self.ids: list[int] = []
    self.sent = 0
    self.hold = max((len(s) for s in stop), default=1) - 1

  def text(self) -> str:
    if self.tokenizer is None:
      return ""
    text = self.tokenizer.decode(self.ids)
    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]

  def push(self, ids: list[int]) -> str:
    self.ids.extend(ids)
    text = self.text()
    safe = len(text) - self.hold
    while safe > self.sent and text[safe - 1] == "\ufffd":
      safe -= 1
    if safe <= self.sent:
      return ""
    out, self.sent = text[self.sent:safe], safe
    return out

  def final(self) -> str:
    text = self.text()
    out, self.sent = text[self.sent:], len(text)
    return out

"""Sampling with a KV cache: prefill the prompts, then jitted loops of single-token steps.

Prompts of different lengths are left-padded into one batch: padded cache slots are masked
out and RoPE positions start at 0 at each prompt's first token, so a row decodes exactly as it
would alone. With parameters split over a training mesh, the rows, their tokens and the KV
cache are split like a batch (see docs/attention.md).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from nanollama_jax import errors, model, sharding
from nanollama_jax.data import chat
from nanollama_jax.data.tokenizer import Tokenizer


def greedy_tokens(logits_BxV: jax.Array) -> jax.Array:
  """jnp.argmax over the vocabulary (the first of tied maxima; the first NaN where a row has
  one) as plain reductions: XLA's CPU argmax, one reduction over (value, index) pairs, is
  several times slower, and these make a batch-8 decoding step of the CPU model 3-6% faster."""
  V = logits_BxV.shape[-1]
  nan_BxV = jnp.isnan(logits_BxV)  # (XLA's CPU max skips NaNs)
  max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  hits_BxV = jnp.where(jnp.any(nan_BxV, axis=-1, keepdims=True), nan_BxV, logits_BxV == max_Bx1)
  return jnp.min(jnp.where(hits_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Next tokens: argmax when temperature is 0, else sampled from the top-k / top-p set."""
  if temperature == 0:
    return greedy_tokens(logits_BxV)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_B1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _rows(x: jax.Array) -> jax.Array:
  """Rows split over the devices like a batch (under a mesh)."""
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@functools.cache
def _graph(model_cfg_json: str):
  """The model's structure, built outside any mesh context (its logical axis names are not mesh
  axes)."""
  return model.graph(ml_collections.ConfigDict(json.loads(model_cfg_json)))


@functools.partial(jax.jit, static_argnames=("model_cfg_json", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "return_logits", "phases"))
def _decode(params, tokens_BxP, lengths_B, seed, stop_S, *, model_cfg_json, max_new_tokens,
            temperature, top_k, top_p, return_logits, phases=1):
  model_cfg = ml_collections.ConfigDict(json.loads(model_cfg_json))
  rng = jax.random.key(seed)
  graphdef = _graph(model_cfg_json)
  B, P = tokens_BxP.shape
  S = P + max_new_tokens
  pad_B = P - lengths_B
  valid_BxS = jnp.arange(S)[None, :] >= pad_B[:, None]
  # The decoding runs in `phases` loops, the n-th up to new token `ends[n]` with a cache of P +
  # ends[n] slots, lengthened between loops: each step's attention reads that cache, not S slots.
  ends = sorted({max(1, -(-max_new_tokens * (j + 1) // phases)) for j in range(phases)})
  cache = model.init_cache(model_cfg, valid_BxS[:, :P + ends[0]])
  positions_BxP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
  logits_BxV, cache = model.apply_with_cache(graphdef, params, tokens_BxP, positions_BxP, cache,
                                             prefill=True)
  V = logits_BxV.shape[-1]

  def pick(logits_BxV, step):
    return sample_logits(logits_BxV, jax.random.fold_in(rng, step), temperature, top_k, top_p)

  layers = model.unstacked_layers(model_cfg, params)
  first_B = pick(logits_BxV, 0)
  out_BxN = _rows(jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first_B))
  seen_BxNxV = jnp.zeros((B, max_new_tokens if return_logits else 0, V), jnp.float32)
  if return_logits:
    seen_BxNxV = seen_BxNxV.at[:, 0].set(logits_BxV)
  done_B = jnp.isin(first_B, stop_S)

  def cond(carry, end):
    step, _, _, _, done_B, _ = carry
    return (step < end) & ~jnp.all(done_B)

  def body(carry):
    step, cache, last_B, out_BxN, done_B, seen_BxNxV = carry
    positions_Bx1 = (lengths_B + step - 1)[:, None]
    logits_BxV, cache = model.apply_with_cache(graphdef, params, last_B[:, None],
                                               positions_Bx1, cache, layer_params=layers)
    next_B = pick(logits_BxV, step)
    next_B = jnp.where(done_B, stop_S[0], next_B)
    out_BxN = _rows(out_BxN.at[:, step].set(next_B))
    if return_logits:
      seen_BxNxV = seen_BxNxV.at[:, step].set(logits_BxV)
    return step + 1, cache, next_B, out_BxN, done_B | jnp.isin(next_B, stop_S), seen_BxNxV

  carry = (jnp.int32(1), cache, first_B, out_BxN, done_B, seen_BxNxV)
  for j, end in enumerate(ends):
    if j:
      carry = (carry[0], model.grow_cache(carry[1], valid_BxS[:, :P + end]), *carry[2:])
    carry = jax.lax.while_loop(functools.partial(cond, end=end), body, carry)
  _, _, _, out_BxN, _, seen_BxNxV = carry
  return out_BxN, seen_BxNxV


def generate(model_cfg: ml_collections.ConfigDict, params: dict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | Sequence[int] | None = 2, pad_id: int = 3,
             return_logits: bool = False, pad_to: int = 0):
  """Continues each prompt (token ids, BOS included if wanted) by up to `max_new_tokens`.

  A row stops at `eos_id`, or at any of several ids (the chat format's end of turn and EOS).
  Returns one list of new token ids per prompt, ending before its stop; with `return_logits`,
  also the float32 logits each new token was chosen from, [B, max_new_tokens, V] (zeros after a
  row stopped, or once every row has). The prompts are left-padded to the longest of them, or
  to `pad_to` tokens if that is more: batches padded to a few lengths share compiled programs.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise errors.UsageError("every prompt needs at least one token (e.g. BOS)")
  if max_new_tokens < 1:
    raise errors.UsageError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise errors.UsageError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], "
                            f"top_k={top_k} >= 0")
  P = max(pad_to, *(len(p) for p in prompts))
  if P + max_new_tokens > model_cfg.max_seq_len:
    raise errors.UsageError(f"prompt ({P} tokens with padding) + max_new_tokens={max_new_tokens} "
                            f"exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  mesh = _mesh_of(params)
  # Rows split over data x fsdp like a training batch: padded to a multiple of that split with
  # copies of the first prompt, whose continuations are dropped.
  split = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
  rows = [*prompts, *[prompts[0]] * (-len(prompts) % split)]
  tokens = np.full((len(rows), P), pad_id, np.int32)
  for i, p in enumerate(rows):
    tokens[i, P - len(p):] = p
  lengths = np.array([len(p) for p in rows], np.int32)
  stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
  cfg_json = json.dumps(model_cfg.to_dict(), sort_keys=True)
  _graph(cfg_json)  # built here, outside the mesh context _decode is traced under
  decode = functools.partial(
    _decode, model_cfg_json=cfg_json,
    max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
    top_p=float(top_p), return_logits=return_logits, phases=_phases(model_cfg, P, max_new_tokens))
  args = (tokens, lengths, np.uint32(seed), np.array(stops or [-1], np.int32))
  if mesh is None:
    out, logits = decode(params, *map(jnp.asarray, args))
  else:
    # Every process holds every prompt; each places the rows of its own devices.
    def put(x):
      spec = (sharding.logical_to_spec(("batch", "length")[:x.ndim], x.shape, mesh)
              if x is tokens or x is lengths else jax.sharding.PartitionSpec())
      return jax.make_array_from_callback(x.shape, jax.sharding.NamedSharding(mesh, spec),
                                          lambda index: x[index])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      out, logits = decode(params, *map(put, args))
    if jax.process_count() > 1:
      out, logits = multihost_utils.process_allgather((out, logits), tiled=True)
  out, logits = np.asarray(out)[:len(prompts)], np.asarray(logits)[:len(prompts)]
  results = []
  for row in out:
    row = row.tolist()
    end = next((i for i, token in enumerate(row) if token in stops), len(row))
    results.append(row[:end])
  return (results, logits) if return_logits else results


MAX_PHASES = 4


def _phases(model_cfg: ml_collections.ConfigDict, prompt: int, max_new_tokens: int) -> int:
  """In how many steps the KV cache grows to its full length: one per quarter of the cache the
  new tokens fill (the attention of each step reads the cache it has, so a longer one costs
  every step; each length compiles a loop of its own). One for a model that scans its layers:
  lengthening its one stacked cache array would hold the old and the new cache at once (up to
  1.75 + 1 times the cache where one loop holds 1), while one array a layer is lengthened a
  layer at a time."""
  if model_cfg.scan_layers:
    return 1
  return max(1, round(MAX_PHASES * max_new_tokens / (prompt + max_new_tokens)))


def _mesh_of(params: dict) -> jax.sharding.Mesh | None:
  """The training mesh the parameters are split over; None on one device."""
  mesh = getattr(getattr(jax.tree.leaves(params)[0], "sharding", None), "mesh", None)
  if not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != set(sharding.MESH_AXES):
    return None
  return mesh


class Samples:
  """Greedy continuations of a run's sample prompts (`train.sample_prompts`), for its log; in a
  chat run (data.format='chat'), the assistant's replies to them as user turns, without the
  reasoning."""

  def __init__(self, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
    self.prompts = [p for p in cfg.train.sample_prompts.split("|") if p.strip()]
    self._chat = chat.formatter(tokenizer) if cfg.data.format == "chat" else None
    if self._chat is not None:
      self._ids = [self._chat.prompt(p) for p in self.prompts]
    else:
      self._ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in self.prompts]
    longest = max(map(len, self._ids), default=0)
    self._new_tokens = min(cfg.train.sample_tokens, cfg.model.max_seq_len - longest)
    self._model_cfg, self._tokenizer = cfg.model, tokenizer

  @property
  def enabled(self) -> bool:
    """Whether there is anything to sample (prompts and train.sample_tokens > 0)."""
    return bool(self.prompts) and self._new_tokens > 0

  def continue_prompts(self, params: dict) -> list[str]:
    """Each prompt followed by its greedy continuation; none when sampling is off."""
    if not self.enabled:
      return []
    tok = self._tokenizer
    stops = self._chat.stop_ids if self._chat is not None else tok.eos_id
    outs = generate(self._model_cfg, params, self._ids, self._new_tokens, eos_id=stops,
                    pad_id=tok.pad_id)
    if self._chat is not None:
      return [f"{p} -> {self._chat.split_reply(o)[1]}" for p, o in zip(self.prompts, outs)]
    return [p + tok.continuation(ids[1:], o) for p, ids, o in zip(self.prompts, self._ids, outs)]

"""Perplexity of a trained model over a whole split or given files: every token counted once."""

from __future__ import annotations

import functools
import sys

import jax
import ml_collections

from nanollama_jax import metrics, model
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer import Tokenizer


def perplexity(cfg: ml_collections.ConfigDict, params: dict, tokenizer: Tokenizer,
               files: str | None = None, progress: bool = True,
               max_batches: int = 10**9) -> dict[str, float]:
  """Token-weighted mean next-token loss and its perplexity over the eval split of `cfg.data`
  (or over `files`, comma-separated globs), with the run's packing: documents as
  [BOS] + tokens + [EOS], each token of each document a target exactly once.
  """
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  if files:
    data_cfg.source, data_cfg.eval_files = "files", files
  batches = pipeline.eval_batches(data_cfg, tokenizer, max_batches)
  step = jax.jit(functools.partial(model.loss_sums, model.graph(cfg.model)))
  loss_sum, count = 0.0, 0.0
  show = progress and sys.stderr.isatty()
  for i, batch in enumerate(batches, 1):
    s, c = step(params, batch)
    loss_sum, count = loss_sum + float(s), count + float(c)
    if show:
      print(f"\rperplexity: batch {i}/{len(batches)}, {int(count):,} tokens", end="",
            file=sys.stderr, flush=True)
  if show:
    print(file=sys.stderr)
  loss = loss_sum / max(count, 1.0)
  return {"loss": loss, "perplexity": metrics.perplexity(loss), "tokens": int(count)}

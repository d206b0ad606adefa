"""Evaluation: the token-weighted mean loss over batches, its perplexity, for training and after.

The trainer evaluates fixed batches of the eval split with `mean_loss`; `perplexity` runs the
same computation over a whole split or given files, every token a target exactly once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections

from nanollama_jax import loss as loss_lib
from nanollama_jax import errors, metrics, model, sharding
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer import Tokenizer

EvalStep = Callable[[dict, dict], tuple[jax.Array, jax.Array]]


def make_eval_step(graphdef, mesh: jax.sharding.Mesh | None = None) -> EvalStep:
  """Returns eval_step(params, batch) -> (loss sum, token count), jitted."""
  return jax.jit(sharding.under_mesh(functools.partial(loss_lib.loss_sums, graphdef), mesh))


def mean_loss(eval_step: EvalStep, params: dict, batches: Sequence[dict],
              progress: bool = False) -> dict[str, float]:
  """{"loss", "perplexity", "tokens"}: the token-weighted mean loss over `batches`.

  With `progress` and a terminal, a counter of batches and tokens on stderr.
  """
  show = progress and sys.stderr.isatty()
  loss_sum, count = 0.0, 0.0
  for i, batch in enumerate(batches, 1):
    s, c = eval_step(params, batch)
    loss_sum, count = loss_sum + float(s), count + float(c)
    if show:
      print(f"\rperplexity: batch {i}/{len(batches)}, {int(count):,} tokens", end="",
            file=sys.stderr, flush=True)
  if show:
    print(file=sys.stderr)
  loss = loss_sum / max(count, 1.0)
  return {"loss": loss, "perplexity": metrics.perplexity(loss), "tokens": int(count)}


def perplexity(cfg: ml_collections.ConfigDict, params: dict, tokenizer: Tokenizer,
               files: str | None = None, progress: bool = True,
               max_batches: int = 10**9, seq_len: int = 0) -> dict[str, float]:
  """The mean next-token loss and its perplexity over the eval split of `cfg.data` (or over
  `files`, comma-separated globs), with the run's packing and format: documents as [BOS] +
  tokens + [EOS], each token of each document a target exactly once (in a chat run, each token
  the assistant writes). `seq_len`: rows of that many tokens instead of the run's
  data.seq_len (up to the model's max_seq_len, its whole context), as many rows a batch as
  keep the run's tokens per batch; the attention is the run's (its kernels on a GPU or TPU).
  """
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  if seq_len:
    if not 2 <= seq_len <= cfg.model.max_seq_len:
      raise errors.UsageError(f"seq_len={seq_len}: must be in [2, {cfg.model.max_seq_len}] "
                              "(the model's max_seq_len)")
    data_cfg.batch_size = max(1, data_cfg.batch_size * data_cfg.seq_len // seq_len)
    data_cfg.seq_len = seq_len
  if files:
    data_cfg.source, data_cfg.eval_files = "files", files
  batches = pipeline.eval_batches(data_cfg, tokenizer, max_batches)
  return mean_loss(make_eval_step(model.graph(cfg.model)), params, batches, progress)

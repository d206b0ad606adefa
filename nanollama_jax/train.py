"""`python -m nanollama_jax.train --config configs/X.py --workdir DIR`: the training loop.

It wires the modules together and holds no model, data or optimizer logic of its own.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from nanollama_jax import config as config_lib
from nanollama_jax import metrics as metrics_lib
from nanollama_jax import model, optim
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer import load_or_train_tokenizer

Batch = dict[str, Any]


class TrainState(NamedTuple):
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def loss_sums(graphdef, params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The batch's summed next-token loss over its unmasked targets, and their number."""
  logits_BxTxV = model.apply(graphdef, params, batch["inputs"], batch["segment_ids"],
                             batch["positions"])
  return model.cross_entropy(logits_BxTxV, batch["targets"], batch["loss_mask"])


def make_train_step(cfg: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
  """Returns train_step(state, batch) -> (state, metrics): one optimizer update, jitted."""
  grad_accum = cfg.optim.grad_accum

  def sums_and_grads(params: dict, batch: Batch):
    (loss_sum, count), grads = jax.value_and_grad(
      functools.partial(loss_sums, graphdef), has_aux=True)(params, batch)
    return loss_sum, count, grads

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    if grad_accum == 1:
      loss_sum, count, grads = sums_and_grads(state.params, batch)
    else:
      # Micro-batch i is rows [i * B / A, (i + 1) * B / A) of the batch.
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def accumulate(carry, micro_batch):
        return jax.tree.map(jnp.add, carry, sums_and_grads(state.params, micro_batch)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(count, 1.0)
    # The loss is the mean over the step's real tokens, whatever the micro-batching.
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = {
      "loss": loss_sum / count,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), step_metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef):
  """Returns eval_step(params, batch) -> (loss sum, token count), jitted."""
  return jax.jit(functools.partial(loss_sums, graphdef))


def evaluate(eval_step, params: dict, batches: list[Batch]) -> dict[str, float]:
  """Token-weighted mean loss over `batches`, and its perplexity."""
  sums = [eval_step(params, b) for b in batches]
  loss_sum = sum(float(s) for s, _ in sums)
  count = sum(float(c) for _, c in sums)
  loss = loss_sum / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss),
          "eval_tokens": int(count)}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict[str, float]]:
  """Trains `cfg` in `workdir`; returns the final parameters and the last logged numbers."""
  config_lib.validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(cfg))

  tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config_lib.ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({tokenizer.vocab_size} pieces in {cfg.data.tokenizer or 'the workdir tokenizer'})")

  steps = cfg.train.steps
  graphdef = model.graph(cfg.model)
  params = model.init_params(cfg.model, cfg.train.seed)
  logging.info("model: %s parameters (%s without embeddings)",
               f"{model.param_count(params):,}",
               f"{model.param_count(params) - model.embedding_param_count(cfg.model):,}")
  schedule = optim.lr_schedule(cfg.optim, steps)
  tx = optim.make_optimizer(cfg.optim, steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  train_step = make_train_step(cfg, graphdef, tx, schedule)
  eval_step = make_eval_step(graphdef)

  train_iter = pipeline.train_batches(cfg.data, tokenizer)
  eval_set: list[Batch] = []
  if cfg.data.source == "hf" or cfg.data.eval_files:
    eval_set = pipeline.eval_batches(cfg.data, tokenizer, cfg.train.eval_steps)
  else:
    logging.info("data.eval_files is empty: no evaluation in this run")

  writer = metrics_lib.MetricsWriter(workdir, start_step=0)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  last: dict[str, float] = {}
  pending = None  # (step, device metrics) of the last log step, read after the next dispatch
  mark_time, mark_step = time.time(), 0

  def flush() -> None:
    """Logs the pending step's metrics, if any."""
    nonlocal pending, mark_time, mark_step
    if pending is None:
      return
    (step, device_metrics), pending = pending, None
    values = jax.device_get(device_metrics)
    now, done = time.time(), step + 1
    loss = float(values["loss"])
    row = {"loss": loss, "perplexity": metrics_lib.perplexity(loss), "lr": float(values["lr"]),
           "grad_norm": float(values["grad_norm"]), "tokens_seen": done * tokens_per_step}
    eta = None
    if done > mark_step:  # the first step's time is compilation, reported on its own
      step_time = (now - mark_time) / (done - mark_step)
      row.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time)
      eta = (steps - done) * step_time
      mark_time, mark_step = now, done
    if not np.isfinite(loss):
      raise FloatingPointError(f"the training loss is {loss} at step {done}")
    writer.write(done, row)
    metrics_lib.log_line(done, steps, row, eta_s=eta)
    last.update(row)

  start = time.time()
  try:
    for step in range(steps):
      batch = jax.device_put(next(train_iter))
      state, step_metrics = train_step(state, batch)
      if step == 0:
        jax.block_until_ready(state)
        logging.info("first step (compilation included) took %.1fs", time.time() - start)
        mark_time, mark_step = time.time(), 1
      flush()
      done = step + 1
      if done % cfg.train.log_every == 0 or done == steps:
        pending = (step, step_metrics)
      if eval_set and (done % cfg.train.eval_every == 0 or done == steps):
        flush()
        row = evaluate(eval_step, state.params, eval_set)
        writer.write(done, row)
        metrics_lib.log_line(done, steps, row, eta_s=None)
        last.update(row)
        mark_time = time.time()  # evaluation time is not training throughput
    flush()
  finally:
    writer.close()
    train_iter.close()
  logging.info("done: %d steps, %s tokens in %.1fs", steps, f"{steps * tokens_per_step:,}",
               time.time() - start)
  return state.params, last


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A config file (configs/*.py); override fields with --config.group.key=value.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required")
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

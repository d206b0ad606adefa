"""`python -m nanollama_jax.train --config configs/X.py --workdir DIR`: the training loop.

It wires the modules together and holds no model, data or optimizer logic of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from nanollama_jax import checkpoint
from nanollama_jax import config as config_lib
from nanollama_jax import metrics as metrics_lib
from nanollama_jax import attention, evaluate, generate, hostmem, hub, model, optim, paths
from nanollama_jax import sharding
from nanollama_jax.data import DataError, HubUnreachable, holdout, pipeline
from nanollama_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer

Batch = dict[str, Any]


class TrainState(NamedTuple):
  step: jax.Array  # int32: batches consumed, including skipped ones
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] key data, for anything random in the step (none yet)
  bad_run: jax.Array  # int32: consecutive non-finite steps up to this one
  skipped: jax.Array  # int32: non-finite steps skipped in the whole run


def init_state(params: dict, opt_state: optax.OptState, seed: int, step: int = 0,
               bad_run: int = 0, skipped: int = 0, rng: Any = None) -> TrainState:
  """A TrainState around `params` and `opt_state` with its scalar counters."""
  if rng is None:
    rng = jax.random.key_data(jax.random.key(seed))
  return TrainState(jnp.asarray(step, jnp.int32), params, opt_state,
                    jnp.asarray(rng, jnp.uint32), jnp.asarray(bad_run, jnp.int32),
                    jnp.asarray(skipped, jnp.int32))


def make_train_step(cfg: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: jax.sharding.Mesh | None = None,
                    state_sharding: TrainState | None = None):
  """Returns train_step(state, batch) -> (state, metrics): one optimizer update, jitted.

  With a mesh, the state keeps `state_sharding` (see sharding.py) and the batch is split over
  the mesh's batch axes; without one, everything lives on the default device.
  """
  grad_accum = cfg.optim.grad_accum

  def sums_and_grads(params: dict, batch: Batch):
    (loss_sum, count), grads = jax.value_and_grad(
      functools.partial(model.loss_sums, graphdef), has_aux=True)(params, batch)
    return loss_sum, count, grads

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    if grad_accum == 1:
      loss_sum, count, grads = sums_and_grads(state.params, batch)
    else:
      # Micro-batch i is rows i, i + A, i + 2A, ... of the batch, so each device's share of
      # the rows is split evenly over the micro-batches and nothing moves between devices.
      micro = jax.tree.map(lambda x: sharding.constrain(
        x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), (None, "batch", "length")),
        batch)

      def accumulate(carry, micro_batch):
        return jax.tree.map(jnp.add, carry, sums_and_grads(state.params, micro_batch)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(count, 1.0)
    # The loss is the mean over the step's real tokens, whatever the micro-batching.
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)  # before clipping
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    bad = (~ok).astype(jnp.int32)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                    "skipped": bad, "bad_run": (state.bad_run + 1) * bad}
    new_state = TrainState(state.step + 1, keep_old(params, state.params),
                           keep_old(opt_state, state.opt_state), state.rng,
                           step_metrics["bad_run"], state.skipped + bad)
    return new_state, step_metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(sharding.under_mesh(train_step, mesh), donate_argnums=0,
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))


class TrainingError(Exception):
  """The run cannot go on (e.g. too many non-finite steps); the message names the step."""


class Preempted(Exception):
  """SIGTERM or SIGINT stopped the run after a checkpoint was written."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum = signum
    self.step = step
    super().__init__(
      f"{signal.Signals(signum).name} received: stopped after step {step} with a checkpoint in "
      f"{paths.join(workdir, checkpoint.CHECKPOINT_DIR, str(step))}; rerun the same command "
      "to resume")


class _StopRequest:
  """Turns the first SIGTERM/SIGINT into a request to save and stop; a second one kills at once.

  With several processes the request comes from JAX's preemption sync point instead, so that
  every process stops after the same step (JAX's distributed runtime watches SIGTERM there); a
  signal seen by one process alone must not stop it while the others wait in a collective.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in self._SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:  # the second signal: die now, as if no handler were installed
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                    "stopping (send it again to exit at once)", signal.Signals(signum).name)

  def requested(self, step: int) -> bool:
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def state_sharding(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """The abstract TrainState and its shardings on `mesh` (parameters by the logical rules)."""
  abstract_params = model.abstract_params(cfg.model)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  params, opt = sharding.state_shardings(tx, abstract_params, abstract_opt,
                                         model.logical_axes(cfg.model), mesh)
  replicated = sharding.replicated(mesh)
  counter = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(counter, abstract_params, abstract_opt,
                        jax.ShapeDtypeStruct((2,), jnp.uint32), counter, counter)
  return abstract, TrainState(replicated, params, opt, replicated, replicated, replicated)


def lower_train_step(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     target: attention.Target | None = None):
  """The train step of `cfg` on `mesh`, lowered on abstract inputs: no array is allocated.

  `target` (default: the running devices) is the platform the program is built for, so a CPU
  host can lower the exact GPU or TPU step (`Target("tpu", "v5e")`), with `mesh`'s shape.
  `.compile()` on a step lowered for the running devices gives XLA's per-device memory
  estimate (`memory_analysis()`), which is how a recipe is checked on a CPU before it meets its
  accelerator.
  """
  target = target or attention.Target.running()
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  abstract, shardings = state_sharding(cfg, tx, mesh)
  step = make_train_step(cfg, model.graph(cfg.model, target), tx,
                         optim.lr_schedule(cfg.optim, cfg.train.steps), mesh, shardings)
  state = sharding.abstract(abstract, shardings)
  return step.trace(state, abstract_batch(cfg, mesh)).lower(lowering_platforms=(target.platform,))


def abstract_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Batch:
  """A global batch of `cfg` as ShapeDtypeStructs split over `mesh`, as the loop feeds it."""
  rows = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                              sharding=sharding.batch_sharding(mesh))
  batch = {k: rows for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct(rows.shape, jnp.float32, sharding=rows.sharding)
  return batch


def _resume_or_init(cfg: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
                    tx: optax.GradientTransformation, abstract: TrainState, shardings: TrainState):
  """The state to start from (a checkpoint, init_from, or fresh) and the data iterator state.

  Whatever the source, the state is created directly with its shardings, never whole on one
  device.
  """
  target_params = sharding.abstract(abstract.params, shardings.params)
  restored = ckpt.restore(target_params, sharding.abstract(abstract.opt_state, shardings.opt_state),
                          cfg.model)
  if restored is not None:
    meta = restored.meta
    logging.info("resuming from %s/%d: step %d, %s tokens seen", ckpt.directory, restored.step,
                 meta["step"], f"{meta['tokens_seen']:,}")
    saved_steps = restored.config.get("train", {}).get("steps")
    if saved_steps is not None and saved_steps != cfg.train.steps:
      logging.warning("train.steps changed from %d to %d: the learning-rate schedule now spans "
                      "%d steps", saved_steps, cfg.train.steps, cfg.train.steps)
    state = init_state(restored.params, restored.opt_state, cfg.train.seed, step=meta["step"],
                       bad_run=meta["bad_run"], skipped=meta["skipped"], rng=meta["rng"])
    return jax.device_put(state, shardings), restored.data_state
  def fresh(params):
    return init_state(params, tx.init(params), cfg.train.seed)

  if cfg.train.init_from:
    params, step = checkpoint.load_params(cfg.train.init_from, target_params, cfg.model)
    logging.info("initialised the parameters from %s (step %d); optimizer state and step are "
                 "fresh", cfg.train.init_from, step)
    return jax.jit(fresh, out_shardings=shardings)(params), None
  init = jax.jit(lambda: fresh(model.init_params(cfg.model, cfg.train.seed)),
                 out_shardings=shardings)
  return init(), None


class _FailedStart:
  """Removes what a run created in its workdir when it fails before its first step.

  A workdir left with a config and a tokenizer but no step would be taken for a run by the next
  command (which would reuse a tokenizer trained for a run that never happened).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.existed = paths.isdir(workdir)
    self.before = set(paths.listdir(workdir))
    self.started = False

  def __enter__(self) -> _FailedStart:
    return self

  def __exit__(self, kind, error, tb) -> None:
    if kind is None or self.started or jax.process_index() != 0:
      return
    if not self.existed:
      paths.remove(self.workdir)
      return
    for name in set(paths.listdir(self.workdir)) - self.before:
      paths.remove(paths.join(self.workdir, name))


def _tokenizer(cfg: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The run's tokenizer: process 0 copies, reuses or trains it; the others then read it."""
  if jax.process_index() == 0:
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  if jax.process_count() > 1:
    # The others reuse the tokenizer process 0 trained (on a workdir every host can see).
    multihost_utils.sync_global_devices("tokenizer ready")
  if jax.process_index() != 0:
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config_lib.ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({tokenizer.vocab_size} pieces in {cfg.data.tokenizer or 'the workdir tokenizer'})")
  return tokenizer


def _eval_set(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
              batch_sharding: jax.sharding.NamedSharding) -> list[Batch]:
  """The fixed evaluation batches as global arrays; none without an eval split."""
  if not holdout.has_eval_split(cfg.data):
    logging.info("data.eval_files is empty and data.holdout_fraction 0: no evaluation in this run")
    return []
  return [sharding.global_batch(sharding.process_rows(b, batch_sharding), batch_sharding)
          for b in pipeline.eval_batches(cfg.data, tokenizer, cfg.train.eval_steps)]


class _Steps:
  """The loop's bookkeeping: metrics read one step late, log rows and timing, evaluations with
  samples, and checkpoints."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, state: TrainState,
               ckpt: checkpoint.Checkpointer, train_iter: pipeline.Batches, tokenizer: Tokenizer,
               mesh: jax.sharding.Mesh, config_json: str):
    self.cfg, self.ckpt, self.train_iter, self.config_json = cfg, ckpt, train_iter, config_json
    self.start_step = int(state.step)
    self.skipped_total = int(state.skipped)
    self.writer = metrics_lib.MetricsWriter(workdir, start_step=self.start_step)
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.flops_per_token = metrics_lib.model_flops_per_token(cfg.model, cfg.data.seq_len)
    peak_flops, peak_source = metrics_lib.device_peak_flops()
    self.peak_flops = peak_flops * jax.device_count()
    logging.info("%.3g model FLOPs per token; MFU against %.3g FLOP/s (%s, x%d devices)",
                 self.flops_per_token, self.peak_flops, peak_source, jax.device_count())
    self.eval_step = evaluate.make_eval_step(model.graph(cfg.model), mesh)
    self.samples = generate.Samples(cfg, tokenizer)
    self.last: dict[str, float] = {}
    self.pending = None  # (step, device metrics) of the last dispatched step, read one step late
    self.mark_time, self.mark_step = time.time(), self.start_step + 1
    self.bar = metrics_lib.progress(self.start_step, cfg.train.steps)
    self.pusher = (hub.Pusher(workdir, cfg.train.push_to_hub)
                   if cfg.train.push_to_hub and jax.process_index() == 0 else None)
    self.saves = 0
    self.closed = False

  def restart_clock(self) -> None:
    """Time from now on counts as training (not compilation, evaluation or saving)."""
    self.mark_time = time.time()

  def dispatched(self, done: int, step_metrics: dict[str, jax.Array]) -> None:
    """Records step `done` as queued, after reading the metrics of the step before it."""
    self.retire()
    self.pending = (done, step_metrics)
    if self.bar is not None:
      self.bar.step()
    if self.pusher is not None:
      self.pusher.poll()

  def retire(self) -> None:
    """Reads the pending step's metrics: stops on a run of bad steps, logs on log steps."""
    if self.pending is None:
      return
    (done, device_metrics), self.pending = self.pending, None
    values = jax.device_get(device_metrics)
    self.skipped_total += int(values["skipped"])
    if values["skipped"]:
      self._bad_step(done, values)
    if done % self.cfg.train.log_every == 0 or done == self.cfg.train.steps or values["skipped"]:
      self._log(done, values)

  def _bad_step(self, done: int, values: dict[str, Any]) -> None:
    logging.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)", done,
                    float(values["loss"]), float(values["grad_norm"]), int(values["bad_run"]))
    if values["bad_run"] >= self.cfg.train.max_bad_steps:
      raise TrainingError(
        f"{int(values['bad_run'])} non-finite steps in a row, the last at step {done} "
        f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the newest checkpoint is step "
        f"{self.ckpt.latest_step()}: lower optim.lr or check the data before resuming")

  def _log(self, done: int, values: dict[str, Any]) -> None:
    loss = float(values["loss"])
    row = {"loss": loss, "perplexity": metrics_lib.perplexity(loss), "lr": float(values["lr"]),
           "grad_norm": float(values["grad_norm"]), "tokens_seen": done * self.tokens_per_step,
           "skipped_steps": self.skipped_total, "epoch": self.train_iter.epoch}
    if self.cfg.data.packing == "first_fit":
      row["padding"] = self.train_iter.padding_fraction
    eta = None
    now = time.time()
    if done > self.mark_step:  # the first step's time is compilation, reported on its own
      step_time = (now - self.mark_time) / (done - self.mark_step)
      tokens_per_s = self.tokens_per_step / step_time
      row.update(step_time_s=step_time, tokens_per_s=tokens_per_s,
                 mfu=tokens_per_s * self.flops_per_token / self.peak_flops)
      eta = (self.cfg.train.steps - done) * step_time
      self.mark_time, self.mark_step = now, done
    self._record(done, row, eta)
    if self.bar is not None:
      self.bar.show(row)

  def _record(self, done: int, row: dict[str, Any], eta: float | None = None) -> None:
    self.writer.write(done, row)
    metrics_lib.log_line(done, self.cfg.train.steps, row, eta_s=eta, bar=self.bar)
    self.last.update(row)

  def epoch_ended(self, epoch: int, step: int) -> None:
    self.retire()
    metrics_lib.say(f"epoch {epoch} of {self.train_iter.names[0]} complete after step {step}; "
                    f"the latest logged numbers:\n{metrics_lib.summary_table(step, self.last)}",
                    self.bar)

  def evaluate(self, done: int, params: dict, eval_set: list[Batch]) -> None:
    """Evaluates on the fixed batches, then writes the sample continuations."""
    self.retire()
    result = evaluate.mean_loss(self.eval_step, params, eval_set)
    self._record(done, {f"eval_{k}": v for k, v in result.items()})
    texts = self.samples.continue_prompts(params)
    if texts:
      self.writer.write_texts(done, "samples", texts)
      for text in texts:
        metrics_lib.say(f"step {done} sample: {text!r}", self.bar)
    self.restart_clock()

  def save(self, done: int, state: TrainState) -> None:
    self.retire()
    meta = {"tokens_seen": done * self.tokens_per_step, "bad_run": int(state.bad_run),
            "skipped": int(state.skipped), "rng": [int(x) for x in jax.device_get(state.rng)]}
    if self.ckpt.save(done, state.params, state.opt_state, self.train_iter.get_state(), meta,
                      self.config_json):
      logging.info("checkpoint %d: training blocked %.3fs for it", done,
                   self.ckpt.last_blocking_s)
      self.saves += 1
      if self.pusher is not None and (self.saves % self.cfg.train.push_every == 0
                                      or done == self.cfg.train.steps):
        self.pusher.request(done)
    self.restart_clock()

  def close(self, finished: bool = False) -> None:
    """Closes the log; a finished run also waits for its last push to the Hub. Idempotent."""
    if self.closed:
      return
    self.closed = True
    if self.bar is not None:
      self.bar.close()
    self.writer.close()
    if self.pusher is not None:
      self.pusher.close(wait=finished)


def train(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict[str, float]]:
  """Trains `cfg` in `workdir`, resuming from its newest checkpoint if it has one.

  Returns the final parameters and the last logged numbers. Raises Preempted after saving when
  SIGTERM/SIGINT arrives, and TrainingError after `train.max_bad_steps` non-finite steps in a row.
  A run that fails before its first step leaves the workdir as it found it.
  """
  config_lib.validate(cfg)
  steps = cfg.train.steps
  tx = optim.make_optimizer(cfg.optim, steps)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
  abstract, shardings = state_sharding(cfg, tx, mesh)
  logging.info("%s", sharding.describe(mesh, shardings, abstract))
  with _FailedStart(workdir) as start_guard, contextlib.ExitStack() as cleanup:
    checkpoint.check_workdir(workdir, checkpoint.state_bytes(abstract), cfg.train.keep_ckpts)
    config_json = config_lib.to_json(cfg)
    if jax.process_index() == 0:
      paths.write(paths.join(workdir, "config.json"), config_json)
    tokenizer = _tokenizer(cfg, workdir)
    ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_ckpts, cfg.train.async_checkpoint)
    cleanup.callback(ckpt.close)
    state, data_state = _resume_or_init(cfg, ckpt, tx, abstract, shardings)
    start_step = int(state.step)
    n_params = model.param_count(state.params)
    logging.info("model: %s parameters (%s without embeddings)", f"{n_params:,}",
                 f"{n_params - model.embedding_param_count(cfg.model):,}")
    train_step = make_train_step(cfg, model.graph(cfg.model), tx,
                                 optim.lr_schedule(cfg.optim, steps), mesh, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    share, shares = sharding.data_shard(batch_sharding, cfg.data.batch_size)
    if shares > 1:
      logging.info("data: this process reads share %d of %d", share, shares)
    train_iter = pipeline.train_batches(cfg.data, tokenizer, share, shares)
    cleanup.callback(train_iter.close)
    if data_state is not None:
      train_iter.set_state(data_state)
    eval_set = _eval_set(cfg, tokenizer, batch_sharding)
    record = _Steps(cfg, workdir, state, ckpt, train_iter, tokenizer, mesh, config_json)
    cleanup.callback(record.close)
    stop = _StopRequest()
    cleanup.callback(stop.restore)
    start = time.time()
    if start_step >= steps:
      start_guard.started = True
      logging.info("%s is already trained to step %d (train.steps=%d): nothing to do; raise "
                   "train.steps to extend it", workdir, start_step, steps)
    epoch = train_iter.epoch
    for step in range(start_step, steps):
      local = next(train_iter)
      if train_iter.epoch > epoch:
        record.epoch_ended(epoch, step)
        epoch = train_iter.epoch
      state, step_metrics = train_step(state, sharding.global_batch(local, batch_sharding))
      if step == start_step:
        jax.block_until_ready(state)
        start_guard.started = True
        logging.info("first step (compilation included) took %.1fs", time.time() - start)
        record.restart_clock()
      done = step + 1
      record.dispatched(done, step_metrics)
      if eval_set and (done % cfg.train.eval_every == 0 or done == steps):
        record.evaluate(done, state.params, eval_set)
      stopping = stop.requested(done)
      if stopping or done == steps or (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0):
        record.save(done, state)
      if stopping:
        ckpt.wait()
        raise Preempted(stop.signum, done, workdir)
    record.retire()
    ckpt.wait()
    record.close(finished=True)
  if start_step < steps:
    logging.info("done: %d steps, %s tokens in %.1fs", steps - start_step,
                 f"{(steps - start_step) * record.tokens_per_step:,}", time.time() - start)
    if jax.process_index() == 0:
      logging.info("summary:\n%s", metrics_lib.summary_table(steps, record.last))
  return state.params, record.last


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A config file (configs/*.py); override fields with --config.group.key=value.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "host:port of process 0 of a multi-process run (GPU clusters, several processes on one "
  "machine); default $JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", sharding.env_int("JAX_NUM_PROCESSES"),
  "Processes in the run, with --coordinator_address; default $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", sharding.env_int("JAX_PROCESS_ID"),
  "This process's index, with --coordinator_address; default $JAX_PROCESS_ID.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False,
  "Join a multi-process run whose layout JAX reads from the environment (every worker of a "
  "TPU pod slice, a SLURM or Open MPI job). Implied by --coordinator_address.")

_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False,
  "Validate the config, its files and the flags, print what the run would train, and exit "
  "without touching the workdir, the network or the devices.")


def dry_run(cfg: ml_collections.ConfigDict) -> str:
  """What `cfg` would train, in one line; raises ConfigError like a real run would."""
  config_lib.validate(cfg)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  data = (f"the Hub dataset {cfg.data.hf_path}" if cfg.data.source == "hf" and not cfg.data.mixture
          else "a mixture" if cfg.data.mixture else f"files {cfg.data.train_files}")
  return (f"dry run: the config is valid: {model.param_count_formula(cfg.model):,} parameters, "
          f"{tokens_per_step:,} tokens per step x {cfg.train.steps:,} steps = "
          f"{tokens_per_step * cfg.train.steps:,} tokens from {data}; nothing was trained")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (dozens of lines per save) and JAX's start-up notes (such as
  "Unable to initialize backend 'tpu'" on every machine without one); warnings still show."""

  _CHATTY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in self._CHATTY)


USAGE = """\
usage: python -m nanollama_jax.train --config CONFIG.py --workdir DIR [--config.GROUP.FIELD=VALUE ...]

Trains the model of CONFIG.py in DIR, or resumes the run DIR holds. Every config field, with its
default and a comment, is defined in nanollama_jax/config.py (get_default_config); the recipes in
configs/ change only what differs. Groups: model, data, optim, train, mesh.

Common overrides:
  --config.train.steps=200 --config.model.n_layers=2       a shorter run of a smaller model
  --config.data.source=files --config.data.train_files='data/*.jsonl' \\
      --config.data.eval_files=data/val.jsonl            local JSONL, text or Parquet files
  --config.model.attention=xla --config.model.dtype=float32  the portable attention, in float32

Exit codes: 0 done, 1 training failed, 2 the run could not start (a config, data or network
problem, named in one line), 128 + N stopped by signal N after saving a checkpoint.
"""


def _fail(kind: str, message: str) -> None:
  """Ends the program with one line (no traceback) for a mistake the user can fix."""
  print(f"{kind}: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the user's mistakes as one `config error:` line (exit 2)."""
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(USAGE + "\nflags:\n" + flags.FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.split(":", 1)[0]):
    _fail("config error", f"--config {path}: no such file (the recipes are in configs/)")
  try:
    for arg in argv[1:]:
      if arg.startswith("--config."):
        config_lib.check_key(arg[len("--config."):].split("=", 1)[0])
    rest = flags.FLAGS(argv)
    _ = _CONFIG.value  # loads the config file; a broken one raises here
  except config_lib.ConfigError as e:
    _fail("config error", str(e))
  except (flags.Error, KeyError, AttributeError, OSError, TypeError, ValueError) as e:
    _fail("config error", " ".join(str(e).split()))
  return rest


def _offline_command(workdir: str) -> str:
  """The training command of this run on the TinyStories sample that ships with the package."""
  from nanollama_jax.data import sample_dir  # pylint: disable=import-outside-toplevel
  sample = str(sample_dir())
  if sample.startswith(os.getcwd() + os.sep):
    sample = os.path.relpath(sample)
  config_flag = flags.FLAGS["config"]
  keep = {k: v for k, v in config_flags.get_override_values(config_flag).items()
          if not k.startswith("data.")}
  args = ["python", "-m", "nanollama_jax.train", "--config",
          config_flags.get_config_filename(config_flag), "--workdir", workdir,
          *(f"--config.{k}={v}" for k, v in keep.items()), "--config.data.source=files",
          f"--config.data.train_files={os.path.join(sample, 'train.jsonl')}",
          f"--config.data.eval_files={os.path.join(sample, 'validation.jsonl')}"]
  return " ".join(shlex.quote(a) for a in args)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail("usage error", f"unexpected arguments: {' '.join(argv[1:])} (see --help)")
  if _CONFIG.value is None or _WORKDIR.value is None:
    _fail("usage error", "both --config and --workdir are required (see --help)")
  if _DRY_RUN.value:
    try:
      print(dry_run(_CONFIG.value))
    except config_lib.ConfigError as e:
      _fail("config error", str(e))
    return
  if _CONFIG.value.train.keep_host_memory:
    hostmem.keep_freed_memory()  # before JAX starts its CPU backend's threads
  try:
    if _COORDINATOR.value or _MULTIHOST.value:
      sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    _fail("config error", str(e))
  except HubUnreachable as e:
    _fail("network error", f"{e}. To train offline on the TinyStories sample that ships with "
                           f"the package:\n  {_offline_command(_WORKDIR.value)}")
  except DataError as e:
    _fail("data error", str(e))
  except (checkpoint.CheckpointError, TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell's code for "stopped by this signal"


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

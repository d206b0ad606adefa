"""`python -m nanollama_jax.train --config configs/X.py --workdir DIR`: the training loop.

It wires the modules together and holds no model, data or optimizer logic of its own.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
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
from nanollama_jax import generate, hostmem, model, optim, sharding
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer import load_or_train_tokenizer

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


def _under_mesh(fn, mesh: jax.sharding.Mesh | None):
  """`fn` traced with `mesh` as the context, so that activation constraints apply."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


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
  return jax.jit(_under_mesh(train_step, mesh), donate_argnums=0,
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))


def make_eval_step(graphdef, mesh: jax.sharding.Mesh | None = None):
  """Returns eval_step(params, batch) -> (loss sum, token count), jitted."""
  return jax.jit(_under_mesh(functools.partial(model.loss_sums, graphdef), mesh))


def evaluate(eval_step, params: dict, batches: list[Batch]) -> dict[str, float]:
  """Token-weighted mean loss over `batches`, and its perplexity."""
  sums = [eval_step(params, b) for b in batches]
  loss_sum = sum(float(s) for s, _ in sums)
  count = sum(float(c) for _, c in sums)
  loss = loss_sum / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss),
          "eval_tokens": int(count)}


class TrainingError(Exception):
  """The run cannot go on (e.g. too many non-finite steps); the message names the step."""


class Preempted(Exception):
  """SIGTERM or SIGINT stopped the run after a checkpoint was written."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum = signum
    self.step = step
    super().__init__(
      f"{signal.Signals(signum).name} received: stopped after step {step} with a checkpoint in "
      f"{os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step))}; rerun the same command "
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
  abstract_params = jax.eval_shape(lambda: model.init_params(cfg.model, cfg.train.seed))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  params, opt = sharding.state_shardings(tx, abstract_params, abstract_opt,
                                         model.logical_axes(cfg.model), mesh)
  replicated = sharding.replicated(mesh)
  counter = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(counter, abstract_params, abstract_opt,
                        jax.ShapeDtypeStruct((2,), jnp.uint32), counter, counter)
  return abstract, TrainState(replicated, params, opt, replicated, replicated, replicated)


def _placed(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying the matching leaf of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def lower_train_step(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The train step of `cfg` on `mesh`, lowered on abstract inputs: no array is allocated.

  `.compile()` on the result gives XLA's per-device memory estimate (`memory_analysis()`),
  which is how a recipe is checked on a CPU before it meets its accelerator.
  """
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  abstract, shardings = state_sharding(cfg, tx, mesh)
  step = make_train_step(cfg, model.graph(cfg.model), tx,
                         optim.lr_schedule(cfg.optim, cfg.train.steps), mesh, shardings)
  state = _placed(abstract, shardings)
  rows = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                              sharding=sharding.batch_sharding(mesh))
  batch = {k: rows for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct(rows.shape, jnp.float32, sharding=rows.sharding)
  return step.lower(state, batch)


def _resume_or_init(cfg: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
                    tx: optax.GradientTransformation, abstract: TrainState, shardings: TrainState):
  """The state to start from (a checkpoint, init_from, or fresh) and the data iterator state.

  Whatever the source, the state is created directly with its shardings, never whole on one
  device.
  """
  target_params = _placed(abstract.params, shardings.params)
  restored = ckpt.restore(target_params, _placed(abstract.opt_state, shardings.opt_state),
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


def train(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict[str, float]]:
  """Trains `cfg` in `workdir`, resuming from its newest checkpoint if it has one.

  Returns the final parameters and the last logged numbers. Raises Preempted after saving when
  SIGTERM/SIGINT arrives, and TrainingError after `train.max_bad_steps` non-finite steps in a row.
  """
  config_lib.validate(cfg)
  steps = cfg.train.steps
  schedule = optim.lr_schedule(cfg.optim, steps)
  tx = optim.make_optimizer(cfg.optim, steps)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
  abstract, shardings = state_sharding(cfg, tx, mesh)
  logging.info("%s", sharding.describe(mesh, shardings, abstract))
  checkpoint.check_workdir(workdir, checkpoint.state_bytes(abstract), cfg.train.keep_ckpts)
  config_json = config_lib.to_json(cfg)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config_json)
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

  graphdef = model.graph(cfg.model)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_ckpts, cfg.train.async_checkpoint)
  try:
    state, data_state = _resume_or_init(cfg, ckpt, tx, abstract, shardings)
  except BaseException:
    ckpt.close()
    raise
  start_step = int(state.step)
  n_params = model.param_count(state.params)
  logging.info("model: %s parameters (%s without embeddings)", f"{n_params:,}",
               f"{n_params - model.embedding_param_count(cfg.model):,}")
  train_step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
  eval_step = make_eval_step(graphdef, mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  share, shares = sharding.data_shard(batch_sharding, cfg.data.batch_size)
  if shares > 1:
    logging.info("data: this process reads share %d of %d", share, shares)
  train_iter = pipeline.train_batches(cfg.data, tokenizer, share, shares)
  if data_state is not None:
    train_iter.set_state(data_state)
  eval_set: list[Batch] = []
  if cfg.data.source == "hf" or cfg.data.eval_files:
    eval_set = [sharding.global_batch(sharding.process_rows(b, batch_sharding), batch_sharding)
                for b in pipeline.eval_batches(cfg.data, tokenizer, cfg.train.eval_steps)]
  else:
    logging.info("data.eval_files is empty: no evaluation in this run")

  writer = metrics_lib.MetricsWriter(workdir, start_step=start_step)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_token = metrics_lib.model_flops_per_token(cfg.model, cfg.data.seq_len)
  peak_flops, peak_source = metrics_lib.device_peak_flops()
  peak_flops *= jax.device_count()
  logging.info("%.3g model FLOPs per token; MFU against %.3g FLOP/s (%s, x%d devices)",
               flops_per_token, peak_flops, peak_source, jax.device_count())
  last: dict[str, float] = {}
  pending = None  # (step, device metrics) of the last dispatched step, read one step late
  mark_time, mark_step = time.time(), start_step + 1
  skipped_total = int(state.skipped)

  def retire() -> None:
    """Reads the pending step's metrics: stops on a run of bad steps, logs on log steps."""
    nonlocal pending, mark_time, mark_step, skipped_total
    if pending is None:
      return
    (done, device_metrics), pending = pending, None
    values = jax.device_get(device_metrics)
    loss = float(values["loss"])
    skipped_total += int(values["skipped"])
    if values["skipped"]:
      logging.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)", done,
                      loss, float(values["grad_norm"]), int(values["bad_run"]))
      if values["bad_run"] >= cfg.train.max_bad_steps:
        raise TrainingError(
          f"{int(values['bad_run'])} non-finite steps in a row, the last at step {done} "
          f"(train.max_bad_steps={cfg.train.max_bad_steps}); the newest checkpoint is step "
          f"{ckpt.latest_step()}: lower optim.lr or check the data before resuming")
    if not (done % cfg.train.log_every == 0 or done == steps or values["skipped"]):
      return
    now = time.time()
    row = {"loss": loss, "perplexity": metrics_lib.perplexity(loss), "lr": float(values["lr"]),
           "grad_norm": float(values["grad_norm"]), "tokens_seen": done * tokens_per_step,
           "skipped_steps": skipped_total, "epoch": train_iter.epoch}
    if cfg.data.packing == "first_fit":
      row["padding"] = train_iter.padding_fraction
    eta = None
    if done > mark_step:  # the first step's time is compilation, reported on its own
      step_time = (now - mark_time) / (done - mark_step)
      row.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                 mfu=tokens_per_step / step_time * flops_per_token / peak_flops)
      eta = (steps - done) * step_time
      mark_time, mark_step = now, done
    writer.write(done, row)
    metrics_lib.log_line(done, steps, row, eta_s=eta, bar=bar)
    if bar is not None:
      bar.show(row)
    last.update(row)

  def save(done: int) -> None:
    retire()
    meta = {"tokens_seen": done * tokens_per_step, "bad_run": int(state.bad_run),
            "skipped": int(state.skipped), "rng": [int(x) for x in jax.device_get(state.rng)]}
    if ckpt.save(done, state.params, state.opt_state, train_iter.get_state(), meta, config_json):
      logging.info("checkpoint %d: training blocked %.3fs for it", done, ckpt.last_blocking_s)

  prompts = [p for p in cfg.train.sample_prompts.split("|") if p.strip()]
  prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
  sample_tokens = min(cfg.train.sample_tokens,
                      cfg.model.max_seq_len - max(map(len, prompt_ids), default=0))

  def samples(done: int) -> None:
    """Greedy continuations of the sample prompts, to the log and TensorBoard."""
    if not (prompts and sample_tokens > 0):
      return
    outs = generate.generate(cfg.model, state.params, prompt_ids, sample_tokens,
                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    texts = [p + tokenizer.decode(o) for p, o in zip(prompts, outs)]
    writer.write_texts(done, "samples", texts)
    for text in texts:
      metrics_lib.say(f"step {done} sample: {text!r}", bar)

  stop = _StopRequest()
  start = time.time()
  bar = metrics_lib.progress(start_step, steps)
  try:
    if start_step >= steps:
      logging.info("%s is already trained to step %d (train.steps=%d): nothing to do; raise "
                   "train.steps to extend it", workdir, start_step, steps)
    epoch = train_iter.epoch
    for step in range(start_step, steps):
      local = next(train_iter)
      if train_iter.epoch > epoch:
        retire()
        metrics_lib.say(f"epoch {epoch} of {train_iter.names[0]} complete after step {step}; "
                        f"the latest logged numbers:\n{metrics_lib.summary_table(step, last)}",
                        bar)
        epoch = train_iter.epoch
      batch = sharding.global_batch(local, batch_sharding)
      state, step_metrics = train_step(state, batch)
      if step == start_step:
        jax.block_until_ready(state)
        logging.info("first step (compilation included) took %.1fs", time.time() - start)
        mark_time = time.time()
      retire()
      done = step + 1
      pending = (done, step_metrics)
      if bar is not None:
        bar.step()
      if eval_set and (done % cfg.train.eval_every == 0 or done == steps):
        retire()
        row = evaluate(eval_step, state.params, eval_set)
        writer.write(done, row)
        metrics_lib.log_line(done, steps, row, eta_s=None, bar=bar)
        last.update(row)
        samples(done)
        mark_time = time.time()  # evaluation time is not training throughput
      stopping = stop.requested(done)
      if stopping or done == steps or (cfg.train.ckpt_every and
                                       done % cfg.train.ckpt_every == 0):
        save(done)
        mark_time = time.time()
      if stopping:
        ckpt.wait()
        raise Preempted(stop.signum, done, workdir)
    retire()
    ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    stop.restore()
    writer.close()
    train_iter.close()
    ckpt.close()
  if start_step < steps:
    logging.info("done: %d steps, %s tokens in %.1fs", steps - start_step,
                 f"{(steps - start_step) * tokens_per_step:,}", time.time() - start)
    if jax.process_index() == 0:
      logging.info("summary:\n%s", metrics_lib.summary_table(steps, last))
  return state.params, last


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


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (dozens of lines per save); its warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required")
  if _CONFIG.value.train.keep_host_memory:
    hostmem.keep_freed_memory()  # before JAX starts its CPU backend's threads
  try:
    if _COORDINATOR.value or _MULTIHOST.value:
      sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except (checkpoint.CheckpointError, TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell's code for "stopped by this signal"


if __name__ == "__main__":
  app.run(main)

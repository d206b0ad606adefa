"""The training loop: the train step (step.py) plus periodic work as hooks.

`train(cfg, workdir)` trains the config in the workdir, or resumes the run it holds. Each hook
runs every N steps and after the last: evaluation, samples, checkpoints and Hub pushes after a
step; logging when a step's metrics reach the host, one step late, so the device never waits for
them. The command line is cli.py (`python -m nanollama_jax.train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from nanollama_jax import checkpoint, errors, evaluate, generate, hub, init_from, lease, model
from nanollama_jax import paths, preemption, profiling, sharding
from nanollama_jax import config as config_lib
from nanollama_jax import metrics as metrics_lib
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.data import holdout, pipeline
from nanollama_jax.data import tokenizer_source
from nanollama_jax.data.tokenizer import Tokenizer
from nanollama_jax.step import Batch, Built, TrainState, build, init_state

@dataclasses.dataclass(frozen=True)
class Hook:
  """Periodic work: `run(step, arg)` after every `every`-th step (0: never) and, with `at_end`,
  after the last. `arg` is the train state, or the step's metrics for a metrics hook."""
  name: str
  every: int
  run: Callable[[int, Any], None]
  at_end: bool = True

  def due(self, done: int, last: int) -> bool:
    return (self.every > 0 and done % self.every == 0) or (self.at_end and done == last)


class PendingMetrics:
  """A dispatched step's device metrics, read on the host when the next step is dispatched."""

  def __init__(self):
    self._pending: tuple[int, dict[str, jax.Array]] | None = None

  def swap(self, done: int, device_metrics: dict[str, jax.Array]) -> list[tuple[int, dict]]:
    """Queues step `done`; returns the step before it, read now (none at the first step)."""
    ready = self.flush()
    self._pending = (done, device_metrics)
    return ready

  def flush(self) -> list[tuple[int, dict]]:
    """Reads the queued step now (before work that needs every step accounted for)."""
    if self._pending is None:
      return []
    (done, device_metrics), self._pending = self._pending, None
    return [(done, jax.device_get(device_metrics))]


def _stop_on_bad_steps(cfg: ml_collections.ConfigDict, done: int, values: dict[str, Any],
                       ckpt: checkpoint.Checkpointer) -> None:
  """Warns about a skipped (non-finite) step; raises TrainingError after max_bad_steps in a row."""
  logging.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)", done,
                  float(values["loss"]), float(values["grad_norm"]), int(values["bad_run"]))
  if values["bad_run"] >= cfg.train.max_bad_steps:
    raise errors.TrainingError(
      f"{int(values['bad_run'])} non-finite steps in a row, the last at step {done} "
      f"(train.max_bad_steps={cfg.train.max_bad_steps}); the newest checkpoint is step "
      f"{ckpt.latest_step()}: lower optim.lr or check the data before resuming")


def _stop_if_taken_over(held: lease.Lease, done: int) -> None:
  """Raises TrainingError when another run has taken the workdir's lease over."""
  if held.lost is not None:
    raise errors.TrainingError(
      f"another run took this workdir over after step {done} "
      f"({held.lost.describe(time.time())}): this run's lease had not been renewed for "
      f"{lease.STALE_S:.0f}s; it stops without saving, so as not to write over that run")


# --- Setting up a run ---------------------------------------------------------------------------


def _tokenizer(cfg: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The run's tokenizer: process 0 copies, reuses or trains it; the others then read its copy."""
  if jax.process_index() == 0:
    tokenizer = tokenizer_source.load_or_train_tokenizer(
      cfg.data, cfg.model.vocab_size, workdir, lambda: init_from.tokenizer_directory(cfg))
  if jax.process_count() > 1:
    # The others read the copy process 0 made (on a workdir every host can see).
    multihost_utils.sync_global_devices("tokenizer ready")
  if jax.process_index() != 0:
    tokenizer = tokenizer_source.workdir_tokenizer(workdir)
  tokenizer_source.check_vocab(tokenizer, cfg.model)
  return tokenizer


def _resume_or_init(cfg: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer, built: Built
                    ) -> tuple[TrainState, Any]:
  """The state to start from (a checkpoint, init_from, or fresh) and the data iterator state.

  Whatever the source, the state is created directly with its shardings, never whole on one
  device.
  """
  abstract, shardings = built.abstract, built.shardings
  target_params = sharding.abstract(abstract.params, shardings.params)
  restored = ckpt.restore(target_params, sharding.abstract(abstract.opt_state, shardings.opt_state),
                          cfg.model)
  if restored is not None:
    meta = restored.meta
    logging.info("resuming from %s/%d: step %d, %s tokens seen", ckpt.directory, restored.step,
                 meta.step, f"{meta.tokens_seen:,}")
    saved_steps = restored.config.get("train", {}).get("steps")
    if saved_steps is not None and saved_steps != cfg.train.steps:
      logging.warning("train.steps changed from %d to %d: the learning-rate schedule now spans "
                      "%d steps", saved_steps, cfg.train.steps, cfg.train.steps)
    state = init_state(restored.params, restored.opt_state, cfg.train.seed, meta)
    return jax.device_put(state, shardings), restored.data_state
  if cfg.train.init_from:
    params, step = init_from.load_params(cfg.train.init_from, target_params, cfg.model)
    logging.info("initialised the parameters from %s (step %d); optimizer state and step are "
                 "fresh", cfg.train.init_from, step)
    return built.fresh_state(cfg, params), None
  return built.fresh_state(cfg), None


def _eval_set(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
              batch_sharding: jax.sharding.NamedSharding) -> list[Batch]:
  """The fixed evaluation batches as global arrays; none without an eval split."""
  if not holdout.has_eval_split(cfg.data):
    logging.info("data.eval_files is empty and data.holdout_fraction 0: no evaluation in this run")
    return []
  return [sharding.global_batch(sharding.process_rows(b, batch_sharding), batch_sharding)
          for b in pipeline.eval_batches(cfg.data, tokenizer, cfg.train.eval_steps)]


def _train_data(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh: jax.sharding.Mesh,
                data_state: dict[str, Any] | None) -> tuple[pipeline.Batches, set[int]]:
  """This process's training batches, at the checkpoint's position when there is one (see
  pipeline.resume), and the data streams whose position this process saves."""
  batch_size = cfg.data.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  share, shares = sharding.data_shard(batch_sharding, batch_size)
  train_iter = pipeline.resume(cfg.data, tokenizer, share, shares, data_state)
  writers = pipeline.stream_writers(sharding.data_blocks(batch_sharding, batch_size), batch_size,
                                    train_iter.streams)
  return train_iter, {s for s, p in enumerate(writers) if p == jax.process_index()}


# --- The hooks ----------------------------------------------------------------------------------


def _hooks(cfg: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           log: metrics_lib.RunLog, ckpt: checkpoint.Checkpointer, train_iter: pipeline.Batches,
           saves: set[int], tokenizer: Tokenizer) -> tuple[list[Hook], list[Hook]]:
  """(state hooks, metrics hooks) of the run, in the order they run after a step."""
  train_cfg = cfg.train
  config_json = config_lib.to_json(cfg)
  hooks = []
  eval_set = _eval_set(cfg, tokenizer, sharding.batch_sharding(mesh))
  if eval_set:
    eval_step = evaluate.make_eval_step(model.graph(cfg.model), mesh)

    def run_eval(done: int, state: TrainState) -> None:
      result = evaluate.mean_loss(eval_step, state.params, eval_set)
      log.record(done, {f"eval_{k}": v for k, v in result.items()})
    hooks.append(Hook("eval", train_cfg.eval_every, run_eval))
  samples = generate.Samples(cfg, tokenizer)
  if samples.enabled:
    def run_samples(done: int, state: TrainState) -> None:
      texts = samples.continue_prompts(state.params)
      log.trackers.log_texts(done, "samples", texts)
      for text in texts:
        log.say(f"step {done} sample: {text!r}")
    hooks.append(Hook("sample", train_cfg.sample_every, run_samples))
  saved: set[int] = set()

  def run_save(done: int, state: TrainState) -> None:
    # The rows logged up to the checkpoint must survive a kill after it (in a bucket, the
    # metrics are otherwise rewritten only every 30 s).
    log.trackers.flush()
    if ckpt.save(state.params, state.opt_state, train_iter.get_state(saves),
                 state.meta(log.tokens_per_step),
                 config_json):
      saved.add(done)
      logging.info("checkpoint %d: training blocked %.3fs for it", done, ckpt.last_blocking_s)
  hooks.append(Hook("save", train_cfg.ckpt_every, run_save))
  metrics_hooks = [Hook("log", train_cfg.log_every, log.train_row)]
  if train_cfg.push_to_hub and jax.process_index() == 0:
    pusher = hub.Pusher(workdir, train_cfg.push_to_hub)  # a push left running finishes alone

    def run_push(done: int, state: TrainState) -> None:
      if done in saved:
        pusher.request(done)
    hooks.append(Hook("push", train_cfg.push_every or train_cfg.ckpt_every, run_push))
    hooks.append(Hook("finish pushes", 0, lambda done, state: pusher.close(wait=True)))
    # A finished push is reported (and the next one started) as steps go by, off the device.
    metrics_hooks.append(Hook("poll pushes", 1, lambda done, values: pusher.poll(), at_end=False))
  return hooks, metrics_hooks


# --- The loop -----------------------------------------------------------------------------------


def _loop(cfg: ml_collections.ConfigDict, workdir: str, built: Built, state: TrainState,
          train_iter: pipeline.Batches, mesh: jax.sharding.Mesh, log: metrics_lib.RunLog,
          hooks: tuple[list[Hook], list[Hook]], ckpt: checkpoint.Checkpointer,
          start_guard: workdir_lib.FailedStart, held: lease.Lease) -> TrainState:
  """Steps from the state's step to train.steps, running the hooks; returns the last state."""
  state_hooks, metrics_hooks = hooks
  steps, start_step = cfg.train.steps, int(state.step)
  batch_sharding = sharding.batch_sharding(mesh)
  pending, stop = PendingMetrics(), preemption.StopRequest()
  profiler = profiling.Profiler(cfg.train.profile_steps, workdir)

  def account(ready: list[tuple[int, dict]]) -> None:
    for done, values in ready:
      log.skipped_total += int(values["skipped"])
      if values["skipped"]:
        _stop_on_bad_steps(cfg, done, values, ckpt)
      for hook in metrics_hooks:
        if hook.due(done, steps) or values["skipped"]:
          hook.run(done, values)

  try:
    start, epoch = time.time(), train_iter.epoch
    for step in range(start_step, steps):
      local = next(train_iter)
      if train_iter.epoch > epoch:
        account(pending.flush())
        log.say(f"epoch {epoch} of {train_iter.names[0]} complete after step {step}; the "
                f"latest logged numbers:\n{metrics_lib.summary_table(step, log.last)}")
        epoch = train_iter.epoch
      done = step + 1
      with profiler.step(done):
        state, device_metrics = built.train_step(state,
                                                 sharding.global_batch(local, batch_sharding))
      if step == start_step:
        jax.block_until_ready(state)
        start_guard.started = True
        logging.info("first step (compilation included) took %.1fs", time.time() - start)
        log.restart_clock()
      profiler.after(done, state)
      account(pending.swap(done, device_metrics))
      _stop_if_taken_over(held, done)
      stopping = stop.requested(done)
      due = [h for h in state_hooks if h.due(done, steps) or (stopping and h.name == "save")]
      if due:
        account(pending.flush())  # a hook sees every step before it accounted for
        for hook in due:
          hook.run(done, state)
        log.restart_clock()
      if stopping:
        ckpt.wait()
        raise errors.Preempted(stop.signum, done,
                               paths.join(workdir, workdir_lib.CHECKPOINTS, str(done)))
    account(pending.flush())
  finally:
    profiler.stop()
    stop.restore()
  return state


def train(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict[str, float]]:
  """Trains `cfg` in `workdir`, resuming from its newest checkpoint if it has one.

  Returns the final parameters and the last logged numbers. Raises Preempted after saving when
  SIGTERM/SIGINT arrives, TrainingError after `train.max_bad_steps` non-finite steps in a row,
  and errors.WorkdirHeld when another run trains in the workdir. The run holds the workdir's lease
  while it trains; one that fails before its first step leaves the workdir as it found it.
  """
  config_lib.validate(cfg)
  paths.check_backend(workdir)
  cfg = init_from.resolve(cfg, workdir)
  steps = cfg.train.steps
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
  built = build(cfg, mesh)
  logging.info("%s", sharding.describe(mesh, built.shardings, built.abstract))
  start_guard = workdir_lib.FailedStart(workdir, jax.process_index())
  held = lease.acquire(workdir)  # before anything in the workdir changes
  with start_guard, contextlib.ExitStack() as cleanup:
    cleanup.callback(held.release)  # before start_guard removes what a failed start created
    checkpoint.check_workdir(workdir, checkpoint.state_bytes(built.abstract), cfg.train.keep_ckpts)
    if jax.process_index() == 0:
      paths.write(workdir_lib.path(workdir, workdir_lib.CONFIG), config_lib.to_json(cfg))
    tokenizer = _tokenizer(cfg, workdir)
    ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_ckpts, cfg.train.async_checkpoint)
    cleanup.callback(ckpt.close)
    state, data_state = _resume_or_init(cfg, ckpt, built)
    start_step = int(state.step)
    n_params = model.param_count(state.params)
    logging.info("model: %s parameters (%s without embeddings)", f"{n_params:,}",
                 f"{n_params - model.embedding_param_count(cfg.model):,}")
    train_iter, saves = _train_data(cfg, tokenizer, mesh, data_state)
    cleanup.callback(train_iter.close)
    log = metrics_lib.RunLog(cfg, workdir, start_step, int(state.skipped), train_iter.stats)
    cleanup.callback(log.close)
    hooks = _hooks(cfg, workdir, mesh, log, ckpt, train_iter, saves, tokenizer)
    if start_step >= steps:
      start_guard.started = True
      logging.info("%s is already trained to step %d (train.steps=%d): nothing to do; raise "
                   "train.steps to extend it", workdir, start_step, steps)
    start = time.time()
    state = _loop(cfg, workdir, built, state, train_iter, mesh, log, hooks, ckpt, start_guard,
                  held)
    ckpt.wait()
  if start_step < steps:
    logging.info("done: %d steps, %s tokens in %.1fs", steps - start_step,
                 f"{(steps - start_step) * log.tokens_per_step:,}", time.time() - start)
    if jax.process_index() == 0:
      logging.info("summary:\n%s", metrics_lib.summary_table(steps, log.last))
  return state.params, log.last

"""The train step: its state, the jitted update, their shardings, and lowering without devices.

`build(cfg, mesh)` is the one way to get the optimizer, the state's shardings and the jitted step
of a config: the training loop, scripts/benchmark.py, scripts/gpu_smoke.py and aot.py use it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nanollama_jax import attention, checkpoint, model, optim, sharding
from nanollama_jax import loss as loss_lib
from nanollama_jax.data import pipeline

Batch = dict[str, Any]


class TrainState(NamedTuple):
  step: jax.Array  # int32: batches consumed, including skipped ones
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] key data, for anything random in the step (none yet)
  bad_run: jax.Array  # int32: consecutive non-finite steps up to this one
  skipped: jax.Array  # int32: non-finite steps skipped in the whole run

  def meta(self, tokens_per_step: int) -> checkpoint.Meta:
    """The counters a checkpoint saves beside the arrays (reads them from the device)."""
    step = int(self.step)
    return checkpoint.Meta(step=step, tokens_seen=step * tokens_per_step,
                           bad_run=int(self.bad_run), skipped=int(self.skipped),
                           rng=tuple(int(x) for x in jax.device_get(self.rng)))


def init_state(params: dict, opt_state: optax.OptState, seed: int,
               meta: checkpoint.Meta | None = None) -> TrainState:
  """A TrainState around `params` and `opt_state`; counters from `meta` (default: a fresh run)."""
  rng = jax.random.key_data(jax.random.key(seed)) if meta is None else meta.rng
  meta = meta or checkpoint.Meta(step=0, tokens_seen=0)
  return TrainState(jnp.asarray(meta.step, jnp.int32), params, opt_state,
                    jnp.asarray(rng, jnp.uint32), jnp.asarray(meta.bad_run, jnp.int32),
                    jnp.asarray(meta.skipped, jnp.int32))


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
      functools.partial(loss_lib.loss_sums, graphdef), has_aux=True)(params, batch)
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
    mean_loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)  # before clipping
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were.
    ok = jnp.isfinite(mean_loss) & jnp.isfinite(grad_norm)
    keep_old = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    bad = (~ok).astype(jnp.int32)
    step_metrics = {"loss": mean_loss, "grad_norm": grad_norm, "lr": schedule(state.step),
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


class Built(NamedTuple):
  """Everything the loop needs to step a config on a mesh, before any array exists."""
  tx: optax.GradientTransformation
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState
  train_step: Any  # jitted (state, batch) -> (state, metrics)

  def fresh_state(self, cfg: ml_collections.ConfigDict, params: dict | None = None) -> TrainState:
    """Step 0 (with `params` or new ones from train.seed), created directly in its shardings."""
    def fresh(params):
      return init_state(params, self.tx.init(params), cfg.train.seed)
    if params is not None:
      return jax.jit(fresh, out_shardings=self.shardings)(params)
    return jax.jit(lambda: fresh(model.init_params(cfg.model, cfg.train.seed)),
                   out_shardings=self.shardings)()

  def lower(self, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, platform: str):
    """The step lowered for `platform` on abstract inputs of `cfg` on `mesh`: no array exists."""
    state = sharding.abstract(self.abstract, self.shardings)
    return self.train_step.trace(state, abstract_batch(cfg, mesh)).lower(
      lowering_platforms=(platform,))


def build(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          target: attention.Platform | None = None) -> Built:
  """The optimizer, the state's shardings on `mesh` and the jitted step, for `target`'s
  attention (default: the running devices)."""
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  abstract, shardings = state_sharding(cfg, tx, mesh)
  train_step = make_train_step(cfg, model.graph(cfg.model, target), tx,
                               optim.lr_schedule(cfg.optim, cfg.train.steps), mesh, shardings)
  return Built(tx, abstract, shardings, train_step)


def abstract_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Batch:
  """A global batch of `cfg` as ShapeDtypeStructs split over `mesh`, as the loop feeds it."""
  split = sharding.batch_sharding(mesh)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
          for key, (shape, dtype) in pipeline.batch_shapes(cfg.data).items()}


def lower_train_step(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     target: attention.Platform | None = None):
  """The train step of `cfg` on `mesh`, lowered on abstract inputs: no array is allocated.

  `target` (default: the running devices) is the platform the program is built for, so a CPU
  host can lower the exact GPU or TPU step (`attention.Platform("tpu", "v5e")`), with `mesh`'s shape.
  `.compile()` on a step lowered for the running devices gives XLA's per-device memory
  estimate (`memory_analysis()`), which is how a recipe is checked on a CPU before it meets its
  accelerator.
  """
  target = target or attention.Platform.running()
  return build(cfg, mesh, target).lower(cfg, mesh, target.platform)

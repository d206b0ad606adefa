"""How a run's numbers are counted (FLOPs per token, the device's peak, MFU, throughput, ETA)
and shown (the console, the progress bar); `RunLog` hands each row to the trackers
(tracking.py: metrics.jsonl, TensorBoard, Weights & Biases)."""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tqdm
from absl import logging

from nanollama_jax import model, targets, tracking


def model_flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward) of the model's useful work.

  6 x the matmul parameters of the layers and of the output projection (the embedding lookup
  is free), plus attention: per layer, q k^T and p v cost 2 x 2 x D FLOPs per (query, visible
  key) pair forward, and with causal masking a query sees (T + 1) / 2 keys on average. The
  masked half that the XLA path computes anyway is not counted.
  """
  D, L, V = model_cfg.dim, model_cfg.n_layers, model_cfg.vocab_size
  dense = 6 * (L * model.layer_matmul_param_count(model_cfg) + D * V)
  return dense + attention_flops_per_token(model_cfg, seq_len)


def attention_flops_per_token(model_cfg, seq_len: int) -> float:
  """The attention term of model_flops_per_token: 3 x L x 2 x 2 x D x (seq_len + 1) / 2."""
  return 3 * model_cfg.n_layers * 4 * model_cfg.dim * (seq_len + 1) / 2


@functools.cache
def measure_matmul_peak(size: int = 1024, repeats: int = 50) -> float:
  """FLOP/s of a float32 size^3 matmul on the default device (the CPU's 'peak' for MFU).

  The best of `repeats` runs (about 0.4 s at 1024 on 2 cores): the first runs are slowed by
  cold threads and fresh buffers, and best-of-5 read 227 GFLOP/s where best-of-50 read 302 on
  the same 2-core CPU, which inflated every MFU by a third. Measured once per process: later
  runs in the same process reuse the number.
  """
  import time  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def device_peak_flops(device: Any = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "") or ""
  known = targets.peak_flops(kind)
  if known is not None:
    return known
  if device.platform == "cpu":
    return measure_matmul_peak(), "measured float32 1024^3 matmul on this CPU"
  return float("nan"), f"unknown device {kind!r}: no MFU"


def perplexity(loss: float) -> float:
  """exp(loss), saturating at infinity instead of overflowing."""
  return math.exp(loss) if loss < 700 else math.inf


def summary_table(step: int, last: dict[str, Any]) -> str:
  """The end-of-run table (as the TinyStories baseline reports it), in Markdown."""
  def cell(key: str, fmt: str) -> str:
    value = last.get(key)
    return format(value, fmt) if isinstance(value, (int, float)) else "-"
  header = ("| step | train loss | train perplexity | validation loss | validation perplexity "
            "| tokens seen |")
  return "\n".join([
    header, "|" + " --- |" * 6,
    f"| {step} | {cell('loss', '.4f')} | {cell('perplexity', '.2f')} | "
    f"{cell('eval_loss', '.4f')} | {cell('eval_perplexity', '.2f')} | {cell('tokens_seen', ',')} |",
  ])


class Progress:
  """A progress bar on an interactive terminal: step, loss, tokens/s and the time left.

  Log lines go above it (through `write`) instead of breaking it.
  """

  def __init__(self, start_step: int, total_steps: int):
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                          dynamic_ncols=True, desc="train", smoothing=0.1)

  def step(self) -> None:
    self._bar.update(1)

  def show(self, row: dict[str, Any]) -> None:
    """Shows a logged row's loss and tokens/s beside the bar."""
    shown = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
    if "tokens_per_s" in row:
      shown["tok/s"] = f"{row['tokens_per_s']:,.0f}"
    self._bar.set_postfix(shown, refresh=False)

  def write(self, line: str) -> None:
    self._bar.write(line, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()


def progress(start_step: int, total_steps: int) -> Progress | None:
  """A Progress bar when process 0 writes to a terminal; None (plain log lines) otherwise."""
  if jax.process_index() != 0 or not sys.stderr.isatty() or start_step >= total_steps:
    return None
  return Progress(start_step, total_steps)


def say(text: str, bar: Progress | None = None) -> None:
  """Logs `text` on process 0, above the progress bar if there is one."""
  if jax.process_index() != 0:
    return
  if bar is not None:
    bar.write(text)
  else:
    logging.info("%s", text)


def log_line(step: int, total_steps: int, row: dict[str, Any], eta_s: float | None,
             bar: Progress | None = None) -> None:
  """Logs a one-line summary of `row` on process 0 (above the progress bar if there is one)."""
  parts = [f"step {step}/{total_steps}"]
  for key, value in row.items():
    if isinstance(value, float):
      parts.append(f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.3e}")
    else:
      parts.append(f"{key} {value}")
  if eta_s is not None:
    parts.append(f"eta {int(eta_s // 60)}m{int(eta_s % 60):02d}s")
  say(" | ".join(parts), bar)


class RunLog:
  """The rows of a training run: the console (or a progress bar), metrics.jsonl, TensorBoard, and
  the throughput, MFU and ETA of the steps between two logged ones.

  `data_stats()` gives the data's own numbers for each training row (epoch, padding).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, start_step: int,
               skipped: int, data_stats: Callable[[], dict[str, Any]]):
    self.cfg, self._data_stats = cfg, data_stats
    self.trackers = tracking.open_trackers(cfg, workdir, start_step)
    self.bar = progress(start_step, cfg.train.steps)
    self.last: dict[str, Any] = {}
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
    peak_flops, peak_source = device_peak_flops()
    self.peak_flops = peak_flops * jax.device_count()
    logging.info("%.3g model FLOPs per token; MFU against %.3g FLOP/s (%s, x%d devices)",
                 self.flops_per_token, self.peak_flops, peak_source, jax.device_count())
    self.skipped_total = skipped  # non-finite steps skipped so far, counted on as steps retire
    self.mark_time, self.mark_step = time.time(), start_step + 1

  def restart_clock(self) -> None:
    """Time from now on counts as training (not compilation, evaluation or saving)."""
    self.mark_time = time.time()

  def train_row(self, done: int, values: dict[str, Any]) -> None:
    """Logs step `done`'s metrics with the throughput since the last logged step."""
    loss = float(values["loss"])
    row = {"loss": loss, "perplexity": perplexity(loss), "lr": float(values["lr"]),
           "grad_norm": float(values["grad_norm"]), "tokens_seen": done * self.tokens_per_step,
           "skipped_steps": self.skipped_total, **self._data_stats()}
    eta = None
    now = time.time()
    if done > self.mark_step:  # the first step's time is compilation, reported on its own
      step_time = (now - self.mark_time) / (done - self.mark_step)
      tokens_per_s = self.tokens_per_step / step_time
      row.update(step_time_s=step_time, tokens_per_s=tokens_per_s,
                 mfu=tokens_per_s * self.flops_per_token / self.peak_flops)
      eta = (self.cfg.train.steps - done) * step_time
      self.mark_time, self.mark_step = now, done
    self.record(done, row, eta)
    if self.bar is not None:
      self.bar.show(row)

  def record(self, done: int, row: dict[str, Any], eta: float | None = None) -> None:
    self.trackers.log(done, row)
    log_line(done, self.cfg.train.steps, row, eta_s=eta, bar=self.bar)
    self.last.update(row)

  def say(self, text: str) -> None:
    say(text, self.bar)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.trackers.close()

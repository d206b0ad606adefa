"""The first run on a real GPU, in one command: `python scripts/gpu_smoke.py` prints one JSON.

Stages (each records an "error" instead of stopping the others when it fails):
  training      50 steps of configs/tinystories.py on the TinyStories sample the package ships
                (local files, no Hub; attention 'auto', i.e. our Pallas kernel), then the train
                step alone for 50 more on one batch: tokens/s and MFU of the loop (its last 10
                steps, input pipeline included) and of the step alone, the hours the published
                run (491,520,000 tokens) would take at each rate, the losses, and the peak
                device memory (memory_stats)
  kernel_check  our Pallas kernel against the XLA path in bfloat16 on the same inputs: forward
                and gradients, GQA, packed documents, lengths that are not a multiple of a tile
  timings       forward + backward of pallas, cudnn and xla for T = 512 to 8192 at a fixed
                number of tokens, with packed documents

The JSON:
  device        kind, count, platform, generation ("sm_90"); also jax, dry_run, ok
  training      config, steps, model_overrides, batch_tokens, attention (as resolved), losses
                (per logged step); loop and step_only, each {tokens_per_s, mfu,
                hours_for_published_run}; peak_memory_bytes; mfu_peak (where the peak comes from);
                roofline {target, measured_step_s, predicted_step_s, limit, compute_s, memory_s,
                collective_s, measured_over_predicted}: the step alone against the lower bound
                aot.py predicts for the same compiled step (docs/performance.md)
  kernel_check  cases [{T, H, K, E, causal, documents, errors {out, dq, dk, dv}, ok}]: each error
                is max |pallas - xla| / max(1, max |xla|), xla in float32 on the same bfloat16
                inputs; ok against tolerance (2e-2)
  timings       H, K, E, dtype, documents_per_row; rows [{T, batch, pallas, cudnn, xla}], each
                {ms, tflops} or {error}; tflops count the causal pairs only, forward + backward =
                3.5 x forward

Exit status 0 when training ran and the kernel matched, 1 otherwise. On a TPU VM it runs the
training stage alone (the step against its roofline there; our kernel is for GPUs). On a host
with neither it stops at once with one line (status 2). `--dry-run` runs the same stages on the CPU at
toy sizes, the kernels in Pallas interpret mode, to check the script itself: its numbers say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(_ROOT, "configs", "tinystories.py")
PUBLISHED_TOKENS = 491_520_000  # configs/tinystories.py: 30,000 steps of 128 x 128 tokens
TOLERANCE = 2e-2  # bfloat16 kernel against the float32 reference, relative to max(1, max |ref|)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each stage runs: the real sizes, or the dry run's toy ones."""

  cases: tuple[tuple[int, int, int, int, bool, bool], ...]  # T, H, K, E, causal, documents
  lengths: tuple[int, ...]  # timed sequence lengths
  heads: tuple[int, int, int]  # H, K, E of the timings
  tokens: int  # batch x length of each timing
  repeats: int  # timed calls per measurement (the median is kept)
  steps: int  # training steps
  log_every: int
  model: dict = dataclasses.field(default_factory=dict)  # overrides of the recipe
  data: dict = dataclasses.field(default_factory=dict)


GPU = Sizes(
  cases=((1000, 8, 2, 128, True, True),   # the TinyStories heads, a length of no tile's multiple
         (2048, 32, 8, 64, True, True),   # the Llama 3.2 1B heads
         (333, 6, 1, 32, False, False)),  # one K/V head, not causal
  lengths=(512, 1024, 2048, 4096, 8192), heads=(32, 8, 64), tokens=16384, repeats=20,
  steps=50, log_every=10)
DRY_RUN = Sizes(
  cases=((100, 4, 2, 32, True, True),), lengths=(128,), heads=(4, 2, 32), tokens=256, repeats=2,
  steps=4, log_every=2,
  model=dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
  data=dict(batch_size=8, tokenizer_train_docs=2000))


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry-run", action="store_true",
                 help="on the CPU at toy sizes, kernels in Pallas interpret mode: checks the "
                      "script, measures nothing")
  return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
  os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from nanollama_jax import aot, attention, errors, metrics, roofline, sharding, targets, train
from nanollama_jax import step as step_lib
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.attention import pallas
from nanollama_jax.data import pipeline, sample_dir
from nanollama_jax.data.tokenizer_source import workdir_tokenizer
# pylint: enable=wrong-import-position


def _progress(message: str) -> None:
  print(f"gpu_smoke: {message}", file=sys.stderr, flush=True)


def _error(e: Exception) -> dict:
  lines = str(e).strip().splitlines()
  return {"error": f"{type(e).__name__}: {lines[0] if lines else ''}"}


def _inputs(B: int, T: int, H: int, K: int, E: int, seed: int = 0):
  """bfloat16 q, k, v, dout and segment ids of 3 documents per row (uneven lengths)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q, do = (jax.random.normal(key, (B, T, H, E)).astype(jnp.bfloat16) for key in ks[:2])
  k, v = (jax.random.normal(key, (B, T, K, E)).astype(jnp.bfloat16) for key in ks[2:])
  t = np.arange(T)
  segments = 1 + (t >= T // 3 + 5) + (t >= 2 * T // 3 - 7)
  return q, k, v, do, jnp.asarray(np.broadcast_to(segments, (B, T)).astype(np.int32))


def _value_and_grads(impl: str, causal: bool):
  """jit of (q, k, v, dout, segments) -> (out, (dq, dk, dv)) through attention() with `impl`."""
  def run(q, k, v, do, segments):
    out, vjp = jax.vjp(lambda q, k, v: attention.attention(q, k, v, segments, causal, impl),
                       q, k, v)
    return out, vjp(do.astype(out.dtype))
  return jax.jit(run)


def kernel_check(sizes: Sizes) -> dict:
  """Max |pallas - xla| / max(1, max |xla|) of the output and each gradient, per case."""
  cases = []
  for T, H, K, E, causal, documents in sizes.cases:
    q, k, v, do, segments = _inputs(2, T, H, K, E)
    segments = segments if documents else None
    case = {"T": T, "H": H, "K": K, "E": E, "causal": causal, "documents": documents}
    try:
      got = _value_and_grads("pallas", causal)(q, k, v, do, segments)
      want = _value_and_grads("xla", causal)(
        *(x.astype(jnp.float32) for x in (q, k, v, do)), segments)
    except Exception as e:  # pylint: disable=broad-except
      cases.append({**case, **_error(e), "ok": False})
      continue
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
      scale = max(1.0, float(jnp.abs(b).max()))
      errors[name] = float(jnp.abs(a.astype(jnp.float32) - b).max()) / scale
    cases.append({**case, "errors": errors, "ok": max(errors.values()) <= TOLERANCE})
  return {"dtype": "bfloat16", "tolerance": TOLERANCE, "cases": cases,
          "ok": all(c["ok"] for c in cases)}


def _time(impl: str, T: int, sizes: Sizes) -> dict:
  """Median milliseconds of one forward + backward, and the causal TFLOP/s it means."""
  H, K, E = sizes.heads
  B = max(1, sizes.tokens // T)
  q, k, v, do, segments = _inputs(B, T, H, K, E, seed=T)
  step = _value_and_grads(impl, True)
  try:
    jax.block_until_ready(step(q, k, v, do, segments))
    times = []
    for _ in range(sizes.repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v, do, segments))
      times.append(time.perf_counter() - start)
  except Exception as e:  # pylint: disable=broad-except
    return _error(e)
  seconds = statistics.median(times)
  # Forward: q k^T and p v over the T (T + 1) / 2 visible pairs; the backward does 2.5 times that.
  flops = 3.5 * 4 * B * H * E * T * (T + 1) / 2
  return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}


def timings(sizes: Sizes) -> dict:
  H, K, E = sizes.heads
  rows = [{"T": T, "batch": max(1, sizes.tokens // T),
           **{impl: _time(impl, T, sizes) for impl in ("pallas", "cudnn", "xla")}}
          for T in sizes.lengths]
  return {"H": H, "K": K, "E": E, "dtype": "bfloat16", "documents_per_row": 3,
          "flops": "causal pairs only, forward + backward = 3.5 x forward", "rows": rows}


def training_config(sizes: Sizes):
  """configs/tinystories.py on the shipped sample, for `sizes.steps` steps."""
  cfg = runpy.run_path(RECIPE)["get_config"]()
  cfg.model.update(sizes.model)
  cfg.data.update(dict(source="files", train_files=str(sample_dir() / "train.jsonl"),
                       eval_files="", **sizes.data))
  cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, sizes.steps)
  cfg.train.update(dict(steps=sizes.steps, log_every=sizes.log_every, ckpt_every=0,
                        sample_tokens=0))
  return cfg


def _step_tokens_per_s(cfg, workdir: str, steps: int) -> tuple[float, dict]:
  """Tokens/s of the train step alone, on one batch of the sample, with nothing else between
  steps: what the device does when the input pipeline keeps up; and the step time against the
  roofline of the same compiled step (aot.py's prediction, made before any run)."""
  mesh = sharding.make_mesh(cfg.mesh)
  built = step_lib.build(cfg, mesh)
  step, state = built.train_step, built.fresh_state(cfg)
  batches = pipeline.train_batches(cfg.data, workdir_tokenizer(workdir))
  batch = sharding.global_batch(next(batches), sharding.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()  # run as it is: the step is compiled once
  for _ in range(2):  # warm-up
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  took = (time.perf_counter() - start) / steps
  return cfg.data.batch_size * cfg.data.seq_len / took, _against_roofline(cfg, compiled, took)


def _against_roofline(cfg, compiled, measured_s: float) -> dict:
  """The measured step time beside the roofline's bound for it, and their ratio."""
  device = jax.devices()[0]
  target = targets.for_devices(device.device_kind, jax.device_count())
  assumed = None
  if target is None and ARGS.dry_run:  # a CPU: exercise the path with an RTX 3090's peaks
    target, assumed = targets.parse("rtx3090"), "rtx3090 (a dry run: a CPU has no roofline)"
  if target is None:
    return {"error": f"no peaks known for {device.device_kind!r} (nanollama_jax/targets.py)"}
  predicted = aot.Program("train_step", ok=True)
  aot.fill_roofline(predicted, roofline.hlo_costs(compiled.as_text(), jax.device_count()), cfg,
                    target, cfg.data.batch_size * cfg.data.seq_len, cfg.data.seq_len,
                    cfg.data.batch_size)
  return {"target": assumed or target.name, "measured_step_s": measured_s,
          "predicted_step_s": predicted.step_s, "limit": predicted.limit,
          "compute_s": predicted.compute_s, "memory_s": predicted.memory_s,
          "collective_s": predicted.collective_s,
          "measured_over_predicted": measured_s / predicted.step_s}


def training(sizes: Sizes) -> dict:
  """Trains in a temporary workdir, then times the step alone.

  `loop` is the training loop's rate over its last logged window (input pipeline included;
  compilation is not), `step_only` the step's rate on a batch already on the device: when they
  differ, the input pipeline bounds the loop.
  """
  cfg = training_config(sizes)
  out: dict[str, Any] = {
    "config": "configs/tinystories.py", "steps": sizes.steps, "model_overrides": sizes.model,
    "batch_tokens": cfg.data.batch_size * cfg.data.seq_len,
    "attention": attention.resolve(cfg.model.attention, attention.Platform.running())}
  with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as workdir:
    try:
      _, last = train.train(cfg, workdir)
      stats = jax.local_devices()[0].memory_stats() or {}
      step_only, against_roofline = _step_tokens_per_s(cfg, workdir, sizes.steps)
    except Exception as e:  # pylint: disable=broad-except
      return {**out, **_error(e)}
    rows = workdir_lib.read_metrics(workdir)
  peak_flops, peak_source = metrics.device_peak_flops()
  flops_per_token = metrics.model_flops_per_token(cfg.model, cfg.data.seq_len)

  def rate(tokens_per_s: float) -> dict:
    return {"tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (peak_flops * jax.device_count()),
            "hours_for_published_run": PUBLISHED_TOKENS / tokens_per_s / 3600}

  return {**out, "losses": {row["step"]: row["loss"] for row in rows if "loss" in row},
          "loop": rate(last["tokens_per_s"]), "step_only": rate(step_only),
          "roofline": against_roofline,
          "peak_memory_bytes": stats.get("peak_bytes_in_use"), "mfu_peak": peak_source,
          "published_run_tokens": PUBLISHED_TOKENS}


def main() -> None:
  sizes = DRY_RUN if ARGS.dry_run else GPU
  target = attention.Platform.running()
  if ARGS.dry_run:
    os.environ[pallas.INTERPRET_ENV] = "1"
  elif target.platform not in ("cuda", "tpu"):
    raise errors.UsageError(
      f"JAX sees no CUDA GPU here, only {target.platform} devices: run it on the GPU machine "
      "(pip install -e '.[cuda]'), or add --dry-run to check the script on a CPU")
  device = jax.devices()[0]
  report: dict[str, Any] = {
    "dry_run": ARGS.dry_run, "jax": jax.__version__,
    "device": {"kind": device.device_kind, "count": jax.device_count(),
               **dataclasses.asdict(target)}}
  # Training first, so that the peak memory reported is the training step's.
  _progress(f"training {sizes.steps} steps of configs/tinystories.py")
  report["training"] = training(sizes)
  if target.platform == "tpu":  # our kernel is for GPUs; a TPU runs splash, JAX's own
    report["ok"] = "error" not in report["training"]
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)
  _progress("checking the pallas kernel against xla")
  report["kernel_check"] = kernel_check(sizes)
  _progress(f"timing pallas, cudnn and xla at T = {', '.join(map(str, sizes.lengths))}")
  report["timings"] = timings(sizes)
  report["ok"] = report["kernel_check"]["ok"] and "error" not in report["training"]
  print(json.dumps(report, indent=2))
  sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
  errors.cli(main)

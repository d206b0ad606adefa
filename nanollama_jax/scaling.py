"""Scaling-law sweeps: a grid of model sizes x token budgets, each an ordinary run, and a fit of
L(N, D) = E + A / N^alpha + B / D^beta to their final validation losses.

Sizes are target widths. A width `dim` scales the base recipe by m = dim / base dim: the head
dimension stays the base's, so n_heads = dim / head_dim; n_layers = max(1, round(m x base
layers)) (width and depth grow together); the KV heads keep the base's query-per-KV-head ratio;
ffn_dim = m x base ffn_dim, rounded to a multiple of 8. Vocabulary, context, batch, learning
rate and its floor are the base's. A token budget D sets steps = D / (batch x seq_len), warmup
the base's fraction of them, and the cosine decays to min_lr at the last step: every run gets a
schedule sized to its own budget. All runs share one tokenizer, so their losses are comparable.

N is the non-embedding parameter count (the embedding and output projection excluded, as in
Kaplan et al. 2020, "Scaling Laws for Neural Language Models"), and compute is C = 6 N D.

The fit is the third approach of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language
Models"): minimise the Huber loss (delta 1e-3) between log L and
log(exp(a - alpha log N) + exp(b - beta log D) + exp(e)), with A = exp(a), B = exp(b),
E = exp(e), by L-BFGS-B from a grid of starting points (theirs: alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}); L-BFGS-B runs from the 16 grid points with the
lowest objective. Uncertainty is a bootstrap over runs (resampled with replacement and refitted
from the full fit's optimum and the best grid point). At a budget C the compute-optimal split
minimises L(N, C / 6N): N_opt = G (C/6)^(beta / (alpha + beta)), D_opt = (C/6)^(alpha / (alpha +
beta)) / G, with G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
import threadpoolctl
from scipy import optimize

from nanollama_jax import checkpoint, errors, metrics, model, paths
from nanollama_jax import config as config_lib
from nanollama_jax import train as train_lib
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.data import tokenizer_source

RESULTS, FIGURE = "scaling.json", "scaling.png"
HUBER_DELTA = 1e-3
_GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5),
         "e": np.arange(-1, 1.01, 0.5), "a": np.arange(0, 25.1, 5), "b": np.arange(0, 25.1, 5)}
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


# --- The grid ------------------------------------------------------------------------------------


def parse_count(text: str) -> int:
  """'256k' -> 256000, '1.5M' -> 1500000, '4096' -> 4096 (decimal suffixes k, M, B)."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text)
  if not match:
    raise errors.ConfigError(f"{text!r} is not a count such as 4096, 256k, 1.5M or 2B")
  return int(round(float(match.group(1)) * _SUFFIXES[match.group(2).lower()]))


def count_label(n: int) -> str:
  """256000 -> '256k', 1500000 -> '1.5M': the inverse of parse_count for run names."""
  for suffix, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
    if n >= scale:
      return f"{n / scale:g}{suffix}"
  return str(n)


def scaled_model(model_cfg: ml_collections.ConfigDict, dim: int) -> ml_collections.ConfigDict:
  """The base recipe's model group `model_cfg` scaled to width `dim` (see the module docstring)."""
  head_dim = model_cfg.dim // model_cfg.n_heads
  if dim < head_dim or dim % head_dim:
    raise errors.ConfigError(f"size {dim}: must be a multiple of the base recipe's head "
                             f"dimension {head_dim} (model.dim / model.n_heads = "
                             f"{model_cfg.dim} / {model_cfg.n_heads})")
  m = dim / model_cfg.dim
  n_heads = dim // head_dim
  per_kv = model_cfg.n_heads // model_cfg.n_kv_heads
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  out.update(dict(dim=dim, n_heads=n_heads, n_layers=max(1, round(m * model_cfg.n_layers)),
                  n_kv_heads=max(k for k in range(1, max(1, n_heads // per_kv) + 1)
                                 if n_heads % k == 0),
                  ffn_dim=max(8, 8 * round(m * model_cfg.ffn_dim / 8))))
  return out


def non_embedding_params(model_cfg: ml_collections.ConfigDict) -> int:
  """N: the parameters outside the token embedding and the output projection."""
  return model.param_count_formula(model_cfg) - model.embedding_param_count(model_cfg)


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its name, config, N, and the tokens its steps consume."""
  name: str
  cfg: ml_collections.ConfigDict
  params: int
  tokens: int

  @property
  def compute(self) -> float:
    return 6.0 * self.params * self.tokens


def run_config(base: ml_collections.ConfigDict, dim: int, tokens: int, tokenizer: str,
               train_files: str, eval_files: str) -> ml_collections.ConfigDict:
  """The full config of the run of width `dim` on `tokens` training tokens."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.model = scaled_model(base.model, dim)
  per_step = cfg.data.batch_size * cfg.data.seq_len
  steps = tokens // per_step
  if steps < 2:
    raise errors.ConfigError(
      f"{count_label(tokens)} tokens is {steps} step(s) of {per_step:,} tokens "
      f"(data.batch_size x data.seq_len): give budgets of at least {2 * per_step}")
  cfg.data.update(dict(source="files", train_files=train_files, eval_files=eval_files,
                       tokenizer=tokenizer, mixture=""))
  warmup = max(1, round(steps * base.optim.warmup_steps / base.train.steps))
  cfg.optim.warmup_steps = min(warmup, steps - 1)
  # One evaluation and one checkpoint, at the end (and on SIGINT/SIGTERM, which stop the sweep).
  cfg.train.update(dict(steps=steps, eval_every=steps, log_every=max(1, steps // 10),
                        ckpt_every=0, keep_ckpts=1, sample_tokens=0, init_from=""))
  return cfg


def grid(base: ml_collections.ConfigDict, dims: Sequence[int], budgets: Sequence[int],
         tokenizer: str, train_files: str, eval_files: str) -> list[Run]:
  """The runs of a sweep, smallest model and budget first."""
  runs = []
  for dim, tokens in itertools.product(sorted(dims), sorted(budgets)):
    cfg = run_config(base, dim, tokens, tokenizer, train_files, eval_files)
    config_lib.validate(cfg)
    trained = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    runs.append(Run(f"d{dim}_{count_label(tokens)}", cfg, non_embedding_params(cfg.model),
                    trained))
  return runs


# --- Running it ----------------------------------------------------------------------------------


def final_eval_loss(workdir: str, cfg: ml_collections.ConfigDict) -> float | None:
  """The validation loss of a finished run of `cfg` in `workdir`; None if it is not finished.

  Raises ValueError when `workdir` holds a run of another config.
  """
  path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  if saved != json.loads(config_lib.to_json(cfg)):
    now = json.loads(config_lib.to_json(cfg))
    diff = [f"{g}.{k}: {saved.get(g, {}).get(k)!r} -> {v!r}" for g, fields in now.items()
            for k, v in fields.items() if saved.get(g, {}).get(k) != v]
    raise errors.ConfigError(
      f"{workdir} holds a run of another config ({'; '.join(diff[:4])}): use "
      "another --out, or delete that run")
  if cfg.train.steps not in checkpoint.steps_on_disk(workdir):
    return None
  losses = [r["eval_loss"] for r in workdir_lib.read_metrics(workdir)
            if r.get("step") == cfg.train.steps and "eval_loss" in r]
  return losses[-1] if losses else None


def shared_tokenizer(base: ml_collections.ConfigDict, out_dir: str, train_files: str) -> str:
  """OUT, which keeps the sweep's one tokenizer: the base recipe's own, or one trained once on
  the training files."""
  data_cfg = ml_collections.ConfigDict(base.data.to_dict())
  if not data_cfg.tokenizer:
    data_cfg.update(dict(source="files", train_files=train_files, mixture=""))
  tokenizer_source.load_or_train_tokenizer(data_cfg, base.model.vocab_size, out_dir)
  return os.path.abspath(out_dir)


def sweep(base: ml_collections.ConfigDict, dims: Sequence[int], budgets: Sequence[int],
          out_dir: str, train_files: str, eval_files: str, say: Callable[[str], None] = print,
          bootstrap: int = 100, budget_flops: float | None = None) -> dict[str, Any]:
  """Trains every run of the grid not yet finished under `out_dir`, fits, writes JSON and PNG.

  Each run is an ordinary training run in OUT/<name> (rerunning resumes an interrupted run and
  skips finished ones). Returns the document written to OUT/scaling.json.
  """
  errors.require(errors.MODULES["plot"], "plot", "the sweep's figure")  # before hours of training
  os.makedirs(out_dir, exist_ok=True)
  train_files, eval_files = (",".join(os.path.abspath(p) for p in files.split(","))
                             for files in (train_files, eval_files))
  tokenizer = shared_tokenizer(base, out_dir, train_files)
  runs = grid(base, dims, budgets, tokenizer, train_files, eval_files)
  previous = {r["name"]: r for r in read_results(out_dir).get("runs", [])}
  records = []
  for i, run in enumerate(runs, 1):
    workdir = os.path.join(out_dir, run.name)
    loss = final_eval_loss(workdir, run.cfg)
    seconds = previous.get(run.name, {}).get("train_s")
    if loss is None:
      say(f"[{i}/{len(runs)}] {run.name}: N={run.params:,}, {run.cfg.train.steps} steps of "
          f"{run.cfg.data.batch_size}x{run.cfg.data.seq_len} tokens")
      start = time.time()
      _, last = train_lib.train(run.cfg, workdir)
      loss, seconds = last["eval_loss"], time.time() - start
      say(f"[{i}/{len(runs)}] {run.name}: validation loss {loss:.4f} in {seconds:.0f}s")
    else:
      say(f"[{i}/{len(runs)}] {run.name}: finished earlier, validation loss {loss:.4f}")
    records.append(record(run, workdir, loss, seconds))
  doc = {"runs": records, "fit": fit_report(records, bootstrap, budget_flops)}
  write_results(out_dir, doc)
  plot(records, doc["fit"], os.path.join(out_dir, FIGURE))
  return doc


def record(run: Run, workdir: str, loss: float, seconds: float | None) -> dict[str, Any]:
  """One run's row of scaling.json."""
  model_cfg = run.cfg.model
  return {"name": run.name, "workdir": workdir, "dim": model_cfg.dim,
          "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads,
          "n_kv_heads": model_cfg.n_kv_heads, "ffn_dim": model_cfg.ffn_dim,
          "params_non_embedding": run.params,
          "params_total": model.param_count_formula(model_cfg),
          "tokens": run.tokens, "steps": run.cfg.train.steps,
          "warmup_steps": run.cfg.optim.warmup_steps, "compute_6ND": run.compute,
          "flops_model": (metrics.model_flops_per_token(model_cfg, run.cfg.data.seq_len)
                          * run.tokens),
          "eval_loss": loss, "train_s": seconds}


def read_results(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, RESULTS)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_results(out_dir: str, doc: dict[str, Any]) -> None:
  """OUT/scaling.json, written whole or not at all."""
  paths.write(os.path.join(out_dir, RESULTS), json.dumps(doc, indent=2))


# --- The fit -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, n: Any, d: Any) -> Any:
    return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

  def optimal(self, flops: Any) -> tuple[Any, Any]:
    """(N_opt, D_opt) minimising the loss at compute C = 6 N D; NaN when alpha or beta is 0
    (then the loss does not fall with one of them and all compute goes to the other)."""
    c6 = np.asarray(flops, np.float64) / 6
    if self.alpha <= 0 or self.beta <= 0:
      return c6 * np.nan, c6 * np.nan
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
    return g * c6 ** (self.beta / s), c6 ** (self.alpha / s) / g


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
  """The summed Huber loss of log-loss residuals and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms_3xP = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top_P = terms_3xP.max(0)
  weights_3xP = np.exp(terms_3xP - top_P)
  total_P = weights_3xP.sum(0)
  r_P = top_P + np.log(total_P) - log_l
  weights_3xP /= total_P
  small = np.abs(r_P) <= delta
  value = np.where(small, 0.5 * r_P**2, delta * (np.abs(r_P) - 0.5 * delta)).sum()
  dr_P = np.where(small, r_P, delta * np.sign(r_P))
  grad = np.array([(dr_P * weights_3xP[0]).sum(), (dr_P * weights_3xP[1]).sum(),
                   (dr_P * weights_3xP[2]).sum(), -(dr_P * weights_3xP[0] * log_n).sum(),
                   -(dr_P * weights_3xP[1] * log_d).sum()])
  return float(value), grad


def _grid_values(log_n, log_d, log_l, delta) -> tuple[np.ndarray, np.ndarray]:
  """The starting grid as [G, 5] (a, b, e, alpha, beta) rows and the objective at each."""
  g = _GRID
  starts = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
  a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
  pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  r = np.abs(pred - log_l)
  values = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(1)
  return starts, values


def fit(n: Sequence[float], d: Sequence[float], loss: Sequence[float], starts: int = 16,
        delta: float = HUBER_DELTA, extra_start: np.ndarray | None = None) -> Law:
  """The Huber fit of L(N, D) to runs (N, D, final loss), from the `starts` best grid points."""
  log_n, log_d, log_l = (np.log(np.asarray(x, np.float64)) for x in (n, d, loss))
  grid_starts, values = _grid_values(log_n, log_d, log_l, delta)
  candidates = list(grid_starts[np.argsort(values)[:starts]])
  if extra_start is not None:
    candidates.append(extra_start)
  bounds = [(None, None)] * 3 + [(0.0, 4.0)] * 2
  best = None
  # L-BFGS-B calls BLAS on 5-vectors; OpenBLAS's thread pool made each call 10x slower.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    for theta0 in candidates:
      result = optimize.minimize(_objective, theta0, args=(log_n, log_d, log_l, delta),
                                 jac=True, method="L-BFGS-B", bounds=bounds,
                                 options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9})
      if best is None or result.fun < best.fun:
        best = result
  a, b, e, alpha, beta = best.x
  return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def _theta(law: Law) -> np.ndarray:
  return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def fit_report(records: Sequence[dict[str, Any]], bootstrap: int = 100,
               budget_flops: float | None = None, seed: int = 0) -> dict[str, Any]:
  """The fitted constants, their bootstrap spread over runs, and the compute-optimal N and D at
  `budget_flops` (default: 10x the largest run's 6ND)."""
  n = np.array([r["params_non_embedding"] for r in records], np.float64)
  d = np.array([r["tokens"] for r in records], np.float64)
  loss = np.array([r["eval_loss"] for r in records], np.float64)
  law = fit(n, d, loss)
  flops = budget_flops or 10 * float(np.max(6 * n * d))
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    pick = rng.integers(0, len(records), len(records))
    again = fit(n[pick], d[pick], loss[pick], starts=1, extra_start=_theta(law))
    samples.append([again.E, again.A, again.B, again.alpha, again.beta, *again.optimal(flops)])
  names = ["E", "A", "B", "alpha", "beta", "N_opt", "D_opt"]
  n_opt, d_opt = law.optimal(flops)
  report = {"law": "L(N, D) = E + A / N^alpha + B / D^beta (N non-embedding parameters, D "
                   "tokens)", "huber_delta": HUBER_DELTA,
            **dataclasses.asdict(law), "budget_flops": flops, "N_opt": float(n_opt),
            "D_opt": float(d_opt), "loss_opt": float(law.loss(n_opt, d_opt))}
  if samples:
    table = np.array(samples)
    report["bootstrap"] = {"samples": bootstrap, **{
      name: {f"p{q}": float(np.nanpercentile(table[:, i], q)) for q in (5, 50, 95)}
      for i, name in enumerate(names)}}
  return report


# --- The figure ----------------------------------------------------------------------------------


def plot(records: Sequence[dict[str, Any]], report: dict[str, Any], out: str) -> None:
  """Final validation loss against compute (6ND) for every run, coloured by model size, with the
  fitted loss of each size and the fitted compute-optimal frontier."""
  errors.require(errors.MODULES["plot"], "plot", "the sweep's figure")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  law = Law(*(report[k] for k in ("E", "A", "B", "alpha", "beta")))
  sizes = sorted({r["params_non_embedding"] for r in records})
  colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(sizes)))
  compute = np.array([r["compute_6ND"] for r in records])
  span = np.geomspace(compute.min() / 2, report["budget_flops"], 200)
  fig, ax = plt.subplots(figsize=(7, 4.8))
  for size, colour in zip(sizes, colours):
    mine = sorted((r for r in records if r["params_non_embedding"] == size),
                  key=lambda r: r["tokens"])
    layers = mine[0]["n_layers"]
    label = f"d{mine[0]['dim']}, {layers} layer{'s' if layers > 1 else ''}, N = {size:,}"
    ax.plot([r["compute_6ND"] for r in mine], [r["eval_loss"] for r in mine], "o",
            color=colour, label=label)
    ax.plot(span, law.loss(size, span / (6 * size)), "--", color=colour, alpha=0.6, lw=1)
  n_opt, d_opt = law.optimal(span)
  ax.plot(span, law.loss(n_opt, d_opt), "-", color="black", lw=1.5,
          label="fitted compute-optimal frontier")
  observed = [r["eval_loss"] for r in records]
  ax.set_ylim(0.9 * min(min(observed), float(law.loss(n_opt[-1], d_opt[-1]))),
              max(observed) + 0.3 * (max(observed) - min(observed)))
  ax.set_xscale("log")
  ax.set_xlabel("compute C = 6 N D (FLOPs, N without embeddings)")
  ax.set_ylabel("final validation loss (nats/token)")
  ax.set_title(f"Toy-scale sweep: L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + "
               f"{law.B:.3g}/D^{law.beta:.2f}", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)

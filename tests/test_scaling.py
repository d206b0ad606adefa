"""Scaling sweeps: the grid's configs and parameter counts, the fit, and a tiny sweep end to end."""

import json
import os
import runpy
import shutil

import jax
import numpy as np
import pytest

from helpers import REPO
from nanollama_jax import model, scaling, train
CPU_RECIPE = os.path.join(REPO, "configs", "tinystories_cpu.py")
# Hoffmann et al. 2022, approach 3: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
CHINCHILLA = scaling.Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def chinchilla_grid():
  n, d = np.meshgrid(np.geomspace(1e7, 1e10, 4), np.geomspace(1e9, 1e12, 4))
  return n.ravel(), d.ravel(), CHINCHILLA.loss(n.ravel(), d.ravel())


def test_fit_recovers_known_constants_and_ignores_an_outlier():
  n, d, loss = chinchilla_grid()
  exact = scaling.fit(n, d, loss)
  for name, want in vars(CHINCHILLA).items():
    assert getattr(exact, name) == pytest.approx(want, rel=1e-6), name
  # One run 50% off: the Huber loss (linear beyond 1e-3 in log-loss) barely moves.
  loss[5] *= 1.5
  robust = scaling.fit(n, d, loss)
  assert (robust.E, robust.alpha, robust.beta) == pytest.approx((1.69, 0.34, 0.28), rel=0.01)
  assert (robust.A, robust.B) == pytest.approx((406.4, 410.7), rel=0.02)


def test_compute_optimal_split_minimises_the_loss_at_fixed_compute():
  flops = 5.76e23  # Gopher's budget, the paper's example
  n_opt, d_opt = CHINCHILLA.optimal(flops)
  assert 6 * n_opt * d_opt == pytest.approx(flops)
  assert n_opt == pytest.approx(3.22e10, rel=0.01) and d_opt == pytest.approx(2.98e12, rel=0.01)
  others = n_opt * np.array([0.5, 0.8, 1.25, 2.0])
  assert np.all(CHINCHILLA.loss(others, flops / (6 * others)) > CHINCHILLA.loss(n_opt, d_opt))


def test_bootstrap_intervals_bracket_the_fit():
  n, d, loss = chinchilla_grid()
  loss = loss * np.exp(np.random.default_rng(0).normal(0.0, 0.005, loss.shape))
  records = [{"params_non_embedding": a, "tokens": b, "eval_loss": c}
             for a, b, c in zip(n, d, loss)]
  report = scaling.fit_report(records, bootstrap=20, budget_flops=5.76e23)
  for name in ("E", "alpha", "beta", "N_opt"):
    ci = report["bootstrap"][name]
    assert ci["p5"] <= report[name] <= ci["p95"], (name, ci, report[name])
  assert report["alpha"] == pytest.approx(0.34, abs=0.03)
  assert report["bootstrap"]["samples"] == 20


def test_sizes_scale_width_and_depth_of_the_recipe():
  base = runpy.run_path(CPU_RECIPE)["get_config"]()  # dim 256, 4 layers, 8 / 4 heads, FFN 704
  shapes = {dim: scaling.scaled_model(base.model, dim) for dim in (32, 64, 128, 256)}
  assert [(m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) for m in shapes.values()] == [
    (1, 1, 1, 88), (1, 2, 1, 176), (2, 4, 2, 352), (4, 8, 4, 704)]
  assert shapes[256].to_dict() == base.model.to_dict()
  # N by hand: per layer 2 D^2 (q, o) + 2 D K E (k, v) + 3 D F + 2 D (norms), + D (final norm).
  assert [scaling.non_embedding_params(m) for m in shapes.values()] == [
    2 * 32**2 + 2 * 32 * 32 + 3 * 32 * 88 + 3 * 32,
    2 * 64**2 + 2 * 64 * 32 + 3 * 64 * 176 + 3 * 64,
    2 * (2 * 128**2 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128) + 128,
    4 * (2 * 256**2 + 2 * 256 * 128 + 3 * 256 * 704 + 2 * 256) + 256]
  built = model.param_count(jax.eval_shape(lambda: model.init_params(shapes[128], 0)))
  assert built - 2 * 4096 * 128 == scaling.non_embedding_params(shapes[128]) == 369_280
  with pytest.raises(ValueError, match="size 48: must be a multiple of the base recipe's head"):
    scaling.scaled_model(base.model, 48)

  cfg = scaling.run_config(base, 64, scaling.parse_count("256k"), "tok.model", "t.jsonl", "v.jsonl")
  assert cfg.train.steps == 62  # 256,000 // (32 x 128)
  assert cfg.optim.warmup_steps == 6  # the recipe's 40 of 400 steps, 10%
  assert (cfg.optim.lr, cfg.optim.min_lr) == (base.optim.lr, base.optim.min_lr)
  assert (cfg.train.eval_every, cfg.data.source, cfg.data.tokenizer) == (62, "files", "tok.model")
  assert [scaling.parse_count(s) for s in ("4096", "256k", "1.5M", "2B")] == [
    4096, 256_000, 1_500_000, 2_000_000_000]
  assert [scaling.count_label(n) for n in (4096, 256_000, 1_500_000)] == ["4.096k", "256k", "1.5M"]
  with pytest.raises(ValueError, match="1 step"):
    scaling.run_config(base, 64, 4096, "tok.model", "t.jsonl", "v.jsonl")


TINY_RECIPE = """
import runpy

def get_config():
  cfg = runpy.run_path({cpu!r})["get_config"]()
  cfg.model.vocab_size = 512
  cfg.data.update(dict(seq_len=64, tokenizer_train_docs=300))
  cfg.train.eval_steps = 4
  return cfg
"""


@pytest.mark.slow
def test_a_tiny_sweep_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
  recipe = tmp_path / "tiny.py"
  recipe.write_text(TINY_RECIPE.format(cpu=CPU_RECIPE))
  calls = []
  real_train = train.train
  monkeypatch.setattr(train, "train", lambda cfg, workdir: calls.append(workdir) or
                      real_train(cfg, workdir))
  monkeypatch.chdir(tmp_path)
  main = runpy.run_path(os.path.join(REPO, "scripts", "scaling_sweep.py"))["main"]

  def sweep() -> dict:
    main(["--base", str(recipe), "--sizes", "64,32", "--tokens", "2k,4k", "--batch-size", "8",
          "--out", "sweep", "--bootstrap", "5", "--json"])
    return json.loads(capsys.readouterr().out)

  first = sweep()
  names = ["d32_2k", "d32_4k", "d64_2k", "d64_4k"]
  assert [r["name"] for r in first["runs"]] == names and len(calls) == 4
  assert [r["steps"] for r in first["runs"]] == [3, 7, 3, 7]  # 2,000 // 512, 4,000 // 512
  assert [r["tokens"] for r in first["runs"]] == [1536, 3584, 1536, 3584]
  assert [r["params_non_embedding"] for r in first["runs"]] == [12_640] * 2 + [46_272] * 2
  for r in first["runs"]:
    final = [json.loads(line) for line in open(tmp_path / "sweep" / r["name"] / "metrics.jsonl")]
    assert r["eval_loss"] == final[-1]["eval_loss"] and final[-1]["step"] == r["steps"]
    assert 4.0 < r["eval_loss"] < np.log(512) + 0.3  # learned a little in a few steps
  assert first["fit"]["alpha"] >= 0 and "bootstrap" in first["fit"]
  assert (tmp_path / "sweep" / "scaling.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "sweep" / "scaling.json").read_text())["runs"] == first["runs"]

  # An interrupted sweep: one run lost its checkpoint. Only that run trains again, to the same
  # loss; the others keep their files untouched.
  kept = {n: os.path.getmtime(tmp_path / "sweep" / n / "checkpoints") for n in names}
  shutil.rmtree(tmp_path / "sweep" / "d64_2k" / "checkpoints")
  second = sweep()
  assert calls[4:] == [os.path.join("sweep", "d64_2k")]
  assert [r["eval_loss"] for r in second["runs"]] == pytest.approx(
    [r["eval_loss"] for r in first["runs"]], abs=1e-5)
  for n in names:
    if n != "d64_2k":
      assert os.path.getmtime(tmp_path / "sweep" / n / "checkpoints") == kept[n]

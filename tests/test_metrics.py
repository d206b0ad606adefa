"""Metrics: model FLOPs and MFU, the summary table, the progress bar, and the loss plot."""

import json
import math
import sys
import types

import jax
import pytest

from helpers import run_script, tiny_config
from nanollama_jax import config, metrics, model, train


def test_model_flops_count_matmuls_and_causal_attention():
  cfg = config.get_default_config().model
  cfg.update(dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
  # Per layer: q and o 64x64 each, k and v 64x32 each, three 64x128 MLP matrices.
  matmuls = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 1000
  attention = 3 * 2 * 4 * 64 * (16 + 1) / 2  # 3 x layers x 4 D x mean visible keys
  assert metrics.model_flops_per_token(cfg, 16) == 6 * matmuls + attention
  # The dense part is 6 x the parameters but the norms and the input embedding (a lookup).
  params = model.abstract_params(cfg)
  norms = 2 * 2 * 64 + 64
  assert model.param_count(params) - norms - 1000 * 64 == matmuls


@pytest.mark.parametrize("kind,peak", [
  ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
  ("NVIDIA GH200 480GB", 989e12), ("NVIDIA GeForce RTX 3090", 71e12),
  ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA L40S", 362e12), ("TPU v5 lite", 197e12),
  ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA Tesla T4", float("nan"))])
def test_datasheet_peaks_match_device_kinds(kind, peak):
  device = types.SimpleNamespace(device_kind=kind, platform="gpu")
  got, source = metrics.device_peak_flops(device)
  if math.isnan(peak):
    assert math.isnan(got) and "no MFU" in source
  else:
    assert got == peak and "datasheet" in source


@pytest.mark.slow
def test_mfu_is_logged_against_the_measured_cpu_peak(sample_dir, tokenizer_path, tmp_path):
  peak, source = metrics.device_peak_flops()
  assert "measured" in source and 1e8 < peak < 1e14  # a CPU does 0.1 GFLOP/s to 100 TFLOP/s
  cfg = tiny_config(sample_dir, tokenizer_path, steps=6, log_every=3, eval_every=6)
  cfg.optim.warmup_steps = 2
  train.train(cfg, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  last = [r for r in rows if "mfu" in r][-1]
  expected = (last["tokens_per_s"] * metrics.model_flops_per_token(cfg.model, cfg.data.seq_len)
              / (peak * jax.device_count()))
  assert 0 < last["mfu"] < 1
  assert last["mfu"] == pytest.approx(expected, rel=0.5)  # the peak is re-measured here


def test_summary_table_reports_the_last_numbers():
  table = metrics.summary_table(400, {"loss": 2.5312, "perplexity": 12.567, "eval_loss": 3.6443,
                                      "eval_perplexity": 38.26, "tokens_seen": 1638400})
  assert table.splitlines()[2] == "| 400 | 2.5312 | 12.57 | 3.6443 | 38.26 | 1,638,400 |"
  no_eval = metrics.summary_table(4, {"loss": 5.0, "perplexity": 148.4, "tokens_seen": 512})
  assert no_eval.splitlines()[2] == "| 4 | 5.0000 | 148.40 | - | - | 512 |"


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
  assert metrics.progress(0, 10) is None
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  bar = metrics.progress(4, 10)
  bar.show({"loss": 2.5, "tokens_per_s": 2900.0})
  bar.step()
  metrics.log_line(5, 10, {"loss": 2.5}, eta_s=None, bar=bar)
  bar.step()
  bar.close()
  err = capsys.readouterr().err
  assert "step 5/10 | loss 2.5" in err
  assert "6/10" in err and "loss=2.5000" in err and "tok/s=2,900" in err
  assert metrics.progress(10, 10) is None  # nothing left to train


def test_plot_metrics_draws_a_png(tmp_path):
  rows = [{"step": s, "loss": 5 - s / 200, "lr": 1e-3, "tokens_seen": s * 4096}
          for s in range(25, 401, 25)]
  rows += [{"step": s, "eval_loss": 4.8 - s / 60} for s in (100, 200, 300, 400)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  proc = run_script("plot_metrics.py", "--workdir", str(tmp_path), "--out",
                    str(tmp_path / "loss.png"))
  assert proc.returncode == 0, proc.stderr
  assert "16 train and 4 validation points, last train loss 3.0000 at 1,638,400" in proc.stdout
  png = (tmp_path / "loss.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  proc = run_script("plot_metrics.py", "--workdir", str(tmp_path / "nope"), "--out", "x.png")
  assert proc.returncode == 2 and proc.stderr.startswith("checkpoint error: ")
  assert "nope/metrics.jsonl: no such file" in proc.stderr

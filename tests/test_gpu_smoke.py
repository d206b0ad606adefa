"""scripts/gpu_smoke.py: one clear line without a GPU, and its stages on the CPU (--dry-run)."""

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, cpu_env


def run(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_smoke.py"), *args],
                        cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_without_a_gpu_it_stops_in_one_line():
  ran = run()
  assert ran.returncode == 2 and ran.stdout == ""
  assert ran.stderr.strip().splitlines()[-1] == (
    "usage error: JAX sees no CUDA GPU here, only cpu devices: run it on the GPU machine "
    "(pip install -e '.[cuda]'), or add --dry-run to check the script on a CPU")


@pytest.mark.slow
def test_dry_run_measures_every_stage_on_the_cpu():
  ran = run("--dry-run")
  assert ran.returncode == 0, ran.stderr[-3000:]
  report = json.loads(ran.stdout)
  assert report["dry_run"] and report["ok"] and report["device"]["platform"] == "cpu"

  (case,) = report["kernel_check"]["cases"]
  # The interpreted bfloat16 kernel against the float32 reference: rounding, not zero, not more.
  assert set(case["errors"]) == {"out", "dq", "dk", "dv"}
  assert all(0 < e <= report["kernel_check"]["tolerance"] == 0.02
             for e in case["errors"].values()), case

  (row,) = report["timings"]["rows"]
  assert (row["T"], row["batch"]) == (128, 2)
  for impl in ("pallas", "xla"):
    ms = row[impl]["ms"]
    flops = 3.5 * 4 * 2 * 4 * 32 * 128 * 129 / 2  # B H E T (T + 1) / 2, forward x 3.5
    assert ms > 0 and math.isclose(row[impl]["tflops"], flops / ms / 1e9, rel_tol=1e-9)
  assert "'cudnn' is an NVIDIA GPU kernel and the target is cpu" in row["cudnn"]["error"]

  training = report["training"]
  assert training["attention"] == "xla"  # 'auto' on a CPU
  assert list(training["losses"]) == ["2", "4"]
  # Untrained, the loss is about ln(vocab) = ln(512) = 6.24.
  assert all(abs(loss - math.log(512)) < 0.15 for loss in training["losses"].values())
  assert training["peak_memory_bytes"] is None  # a CPU keeps no memory_stats
  # The step alone against the roofline of its compiled program (at an RTX 3090's peaks here).
  against = training["roofline"]
  assert against["target"].startswith("rtx3090") and against["predicted_step_s"] > 0
  assert against["predicted_step_s"] == max(against["compute_s"], against["memory_s"],
                                            against["collective_s"])
  assert math.isclose(against["measured_over_predicted"],
                      against["measured_step_s"] / against["predicted_step_s"], rel_tol=1e-9)
  assert math.isclose(against["measured_step_s"], 8 * 128 / training["step_only"]["tokens_per_s"],
                      rel_tol=1e-9)
  for rate in (training["loop"], training["step_only"]):
    assert rate["tokens_per_s"] > 0 and 0 < rate["mfu"] < 1
    assert math.isclose(rate["hours_for_published_run"],
                        491_520_000 / rate["tokens_per_s"] / 3600, rel_tol=1e-9)
  # The same MFU formula for both rates: MFU / (tokens/s) is the FLOPs per token over the peak.
  assert math.isclose(training["loop"]["mfu"] / training["loop"]["tokens_per_s"],
                      training["step_only"]["mfu"] / training["step_only"]["tokens_per_s"])

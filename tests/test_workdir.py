"""The workdir contract (workdir.py) and the one error policy (errors.py)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, run_script

from nanollama_jax import errors, hub, tracking
from nanollama_jax import workdir as workdir_lib

ROWS = [{"step": 1, "loss": 3.0, "tokens_seen": 100}, {"step": 2, "loss": 2.5, "tokens_seen": 200},
        {"step": 2, "eval_loss": 2.75, "eval_perplexity": 15.6}]


def _write(workdir, text: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.METRICS), "w", encoding="utf-8") as f:
    f.write(text)


def _torn(rows) -> str:
  """The file a writer leaves when it dies in the middle of its next row."""
  return "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "loss": 2.'


def test_a_torn_last_line_is_skipped_by_every_reader(tmp_path):
  run = str(tmp_path / "run")
  _write(run, _torn(ROWS))
  assert workdir_lib.read_metrics(run) == ROWS
  # The hub's model card and the trainer's writer read the same rows.
  assert hub._latest_losses(run, 2) == {"loss": 2.5, "eval_loss": 2.75, "eval_perplexity": 15.6,
                                        "tokens_seen": 200}
  writer = tracking.Jsonl(run, start_step=2)
  writer.log(3, {"loss": 2.25})
  writer.close()
  assert [r["step"] for r in workdir_lib.read_metrics(run)] == [1, 2, 2, 3]
  assert workdir_lib.latest(workdir_lib.read_metrics(run), ("loss",), until_step=2) == {
    "loss": 2.5}


def test_a_damaged_middle_line_is_an_error_naming_the_line(tmp_path):
  run = str(tmp_path / "run")
  _write(run, '{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
  with pytest.raises(errors.CheckpointError, match=r"metrics.jsonl, line 2: not JSON"):
    workdir_lib.read_metrics(run)
  _write(run, '{"loss": 3.0}\n')
  with pytest.raises(errors.CheckpointError, match="line 1: not a metrics row"):
    workdir_lib.read_metrics(run)


def test_a_run_that_logged_nothing_reads_as_no_rows(tmp_path):
  assert workdir_lib.read_metrics(str(tmp_path)) == []
  assert workdir_lib.parse_metrics("") == []


def test_plot_metrics_skips_a_torn_last_line(tmp_path):
  run = str(tmp_path / "run")
  _write(run, _torn(ROWS))
  proc = run_script("plot_metrics.py", "--workdir", run, "--out", str(tmp_path / "p.png"))
  assert proc.returncode == 0, proc.stderr
  assert "2 train and 1 validation points, last train loss 2.5000 at 200 tokens" in proc.stdout


def _cli(code: str) -> subprocess.CompletedProcess:
  program = f"from nanollama_jax import errors\n{code}\nerrors.cli(main)\n"
  return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                        cwd=REPO, timeout=60)


@pytest.mark.parametrize("error, line, code", [
  ("errors.ConfigError('model.dim=3: must be even')", "config error: model.dim=3: must be even",
   2),
  ("errors.DataError('a.jsonl, line 4: no field text')", "data error: a.jsonl, line 4: no "
   "field text", 2),
  ("errors.CheckpointError('run/checkpoints/7 is missing')", "checkpoint error: "
   "run/checkpoints/7 is missing", 2),
  ("errors.NetworkError('the Hub cannot be reached')", "network error: the Hub cannot be "
   "reached", 75),
  ("errors.TrainingError('5 non-finite steps')", "training error: 5 non-finite steps", 1),
  ("errors.Preempted(15, 40, 'run/checkpoints/40')", "SIGTERM received: stopped after step 40 "
   "with a checkpoint in run/checkpoints/40; rerun the same command to resume", 143),
  ("FileNotFoundError(2, 'No such file or directory', 'data/x.jsonl')",
   "file error: No such file or directory: data/x.jsonl", 2),
])
def test_cli_prints_one_line_and_the_kinds_exit_code(error, line, code):
  proc = _cli(f"def main():\n  raise {error}")
  assert (proc.returncode, proc.stderr) == (code, line + "\n")


def test_cli_keeps_the_traceback_of_a_bug():
  proc = _cli("def main():\n  return {}['missing']")
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'missing'" in proc.stderr


def test_require_names_the_extra_to_install():
  errors.require(("json",), "plot", "plotting")  # installed: nothing happens
  with pytest.raises(errors.InstallError) as caught:
    errors.require(("json", "no_such_module_x"), "plot", "plotting")
  assert caught.value.line() == (
    "install error: plotting needs no_such_module_x: pip install 'nanollama_jax[plot]' (or pip "
    "install -e \".[plot]\" in a clone)")
  assert caught.value.exit_code == 2


def test_a_bucket_workdir_without_the_gcs_extra_names_the_extra(monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  from nanollama_jax import paths  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  paths.check_backend("runs/local")  # a local path needs nothing
  with pytest.raises(errors.InstallError, match=r"a workdir in Cloud Storage \(gs://b/run\) "
                     r"needs gcsfs: pip install 'nanollama_jax\[gcs\]'"):
    paths.check_backend("gs://b/run")

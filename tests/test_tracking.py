"""The trackers: metrics.jsonl, TensorBoard and Weights & Biases (offline) behind one call, W&B's
history read back from its own .wandb file, a killed run that resumes the same W&B run, and a
W&B that cannot be reached."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, free_port, tiny_config
from nanollama_jax import config, errors, train, tracking

wandb = pytest.importorskip("wandb", reason="the wandb extra (in the test extra) is not installed")


def _offline(cfg, project="nanollama-tests"):
  cfg.wandb.update(project=project, mode="offline", tags="test,cpu")
  return cfg


def _wandb_files(workdir):
  """The .wandb files of the workdir's W&B run, oldest first (one per start of the run)."""
  run_id = json.loads((workdir / "wandb_run.json").read_text())["id"]
  return run_id, sorted(glob.glob(str(workdir / "wandb" / f"*-{run_id}" / f"run-{run_id}.wandb")))


def _run_written(workdir):
  """Whether a .wandb file in the workdir holds its run's record yet."""
  for path in glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")):
    try:
      if any(r.WhichOneof("record_type") == "run" for r in tracking.wandb_records(path)):
        return True
    except Exception:  # pylint: disable=broad-except  # a block W&B is still writing
      pass
  return False


def _by_step(rows):
  """metrics.jsonl's rows merged per step, as W&B keeps them (train and eval rows of a step)."""
  merged = {}
  for row in rows:
    merged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
  return merged


def _history(path):
  """W&B's history rows by step, without its own keys (_step, _runtime, ...) and the tables."""
  return {row["_step"]: {k: v for k, v in row.items()
                         if not k.startswith("_") and not k.startswith("samples")}
          for row in tracking.wandb_history(path)}


def test_the_wandb_file_reader_reads_what_wandb_wrote(tmp_path):
  run = wandb.init(project="p", dir=str(tmp_path), mode="offline", id="reader1",
                   settings=wandb.Settings(console="off", silent=True))
  long = "x" * 50_000  # a record larger than a 32 KiB block: cut into FIRST, MIDDLE, LAST
  for step in range(1, 301):
    run.log({"loss": 1.0 / step, "note_len": len(long) if step == 150 else 0}, step=step)
  run.config.update({"long": long})
  run.finish()
  (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*-reader1" / "run-reader1.wandb"))
  assert tracking.wait_for_wandb_file(path, 30)  # the exit record, after the last rows
  assert os.path.getsize(path) > 2 * 32 * 1024
  history = tracking.wandb_history(path)
  tail = [r.WhichOneof("record_type") for r in tracking.wandb_records(path)][-6:]
  assert [r["_step"] for r in history] == list(range(1, 301)), tail
  assert [r["loss"] for r in history] == [1.0 / s for s in range(1, 301)]
  configs = [r.config for r in tracking.wandb_records(path)
             if r.WhichOneof("record_type") == "config"]
  assert any(item.key == "long" and json.loads(item.value_json) == long
             for c in configs for item in c.update)


def test_wandb_without_its_extra_is_refused_before_the_run(sample_dir, tokenizer_path,
                                                           monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  cfg = _offline(tiny_config(sample_dir, tokenizer_path))
  with pytest.raises(errors.ConfigError, match=r"wandb.project='nanollama-tests': logging to "
                     r"Weights & Biases needs wandb: pip install 'nanollama_jax\[wandb\]'"):
    config.validate(cfg)


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_history_of_metrics_jsonl(sample_dir, tokenizer_path,
                                                                 tmp_path):
  cfg = _offline(tiny_config(sample_dir, tokenizer_path, steps=12, log_every=2, eval_every=6,
                             eval_steps=2, ckpt_every=6, sample_tokens=6, sample_every=6))
  cfg.optim.warmup_steps = 2
  train.train(cfg, str(tmp_path))
  run_id, files = _wandb_files(tmp_path)
  assert len(files) == 1
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert _history(files[0]) == _by_step(rows)  # every row, value for value
  assert sorted(_by_step(rows)) == [2, 4, 6, 8, 10, 12]
  assert {"loss", "perplexity", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu",
          "eval_loss", "eval_perplexity"} <= set(_history(files[0])[12])
  samples = [r for r in tracking.wandb_history(files[0]) if "samples/_type" in r]
  assert [(r["_step"], r["samples/_type"], r["samples/nrows"]) for r in samples] == [
    (6, "table-file", 2), (12, "table-file", 2)]
  (run,) = [r.run for r in tracking.wandb_records(files[0]) if r.WhichOneof("record_type") == "run"]
  assert (run.run_id, run.project, run.display_name, list(run.tags)) == (
    run_id, "nanollama-tests", tmp_path.name, ["test", "cpu"])
  config_items = {item.key for r in tracking.wandb_records(files[0])
                  if r.WhichOneof("record_type") == "config" for item in r.config.update}
  assert {"model", "data", "optim", "train", "mesh", "wandb"} <= config_items


def _config_file(cfg, path):
  """A recipe file that returns `cfg`, for the command line."""
  path.write_text("import json\n\nfrom nanollama_jax import config\n\n\n"
                  "def get_config():\n  cfg = config.get_default_config()\n"
                  f"  cfg.update_from_flattened_dict(json.loads({json.dumps(json.dumps(_flat(cfg.to_dict())))}))\n"
                  "  return cfg\n")
  return path


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "rope_scaling":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class _Run:
  """`python -m nanollama_jax.train` on a recipe file, its output in files beside the workdir."""

  def __init__(self, recipe, workdir, env=None):
    self.log = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log"
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen([sys.executable, "-m", "nanollama_jax.train", "--config",
                                    str(recipe), "--workdir", str(workdir)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT, env=env)

  def wait(self, timeout=300):
    return self.proc.wait(timeout)

  def output(self):
    return self.log.read_text()


def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
          if "loss" in r}


@pytest.mark.slow
def test_a_killed_run_resumes_the_same_wandb_run_with_every_step(sample_dir, tokenizer_path,
                                                                 tmp_path):
  cfg = _offline(tiny_config(sample_dir, tokenizer_path, steps=14, log_every=1, eval_every=14,
                             eval_steps=2, ckpt_every=4))
  cfg.optim.warmup_steps = 2
  recipe = _config_file(cfg, tmp_path / "recipe.py")
  reference = tmp_path / "reference"
  done = _Run(recipe, reference)
  assert done.wait() == 0, done.output()[-3000:]
  workdir = tmp_path / "run"
  first = _Run(recipe, workdir)
  deadline = time.time() + 300
  # Killed once step 6 is logged (after checkpoint 4, before checkpoint 8) and W&B has written
  # the run into its file (its thread may take longer than the first steps).
  while not ((workdir / "metrics.jsonl").exists() and 6 in _losses(workdir)
             and _run_written(workdir)):
    assert first.proc.poll() is None and time.time() < deadline, first.output()[-3000:]
    time.sleep(0.05)
  first.proc.send_signal(signal.SIGKILL)
  first.wait()
  again = _Run(recipe, workdir)
  assert again.wait() == 0, again.output()[-3000:]
  run_id, files = _wandb_files(workdir)
  assert len(files) == 2  # the first start and the resume, one W&B run id
  runs = {r.run.run_id for f in files for r in tracking.wandb_records(f)
          if r.WhichOneof("record_type") == "run"}
  assert runs == {run_id}
  steps = [s for f in files for s in tracking.wandb_history_steps(f)]
  assert sorted(steps) == list(range(1, 15))  # every step once: the replayed ones not again
  losses = {step: row["loss"] for f in files for step, row in _history(f).items() if "loss" in row}
  assert losses == _losses(reference) == _losses(workdir)  # the replay is exact


@pytest.mark.slow
def test_an_unreachable_wandb_costs_a_warning_and_never_the_run(sample_dir, tokenizer_path,
                                                                tmp_path):
  cfg = tiny_config(sample_dir, tokenizer_path, steps=4, log_every=2, eval_every=4, eval_steps=2)
  cfg.optim.warmup_steps = 1
  cfg.wandb.update(project="nanollama-tests", mode="online")
  recipe = _config_file(cfg, tmp_path / "recipe.py")
  env = {**os.environ, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
         "WANDB_API_KEY": "x" * 40}
  start = time.perf_counter()
  run = _Run(recipe, tmp_path / "run", env)
  assert run.wait() == 0, run.output()[-3000:]
  err = run.output()
  warnings = [line for line in err.splitlines() if "Weights & Biases cannot start" in line]
  assert len(warnings) == 1 and "cannot be reached" in warnings[0], err[-3000:]
  assert "the run goes on with metrics.jsonl and TensorBoard" in warnings[0]
  assert len(_losses(tmp_path / "run")) == 2
  print(f"the run took {time.perf_counter() - start:.1f}s")

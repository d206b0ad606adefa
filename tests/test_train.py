"""The training loop end to end: it learns, accumulates gradients exactly, and writes its workdir."""

import json
import math
import os
import runpy
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, tiny_config
from nanollama_jax import evaluate, model, optim, train
from nanollama_jax.data import pipeline
from nanollama_jax.data.tokenizer_source import load as load_tokenizer
from nanollama_jax import step as step_lib


@pytest.mark.slow
def test_training_lowers_validation_loss(sample_dir, tokenizer_path, tmp_path):
  cfg = tiny_config(sample_dir, tokenizer_path)
  tokenizer = load_tokenizer(str(tokenizer_path))
  eval_set = pipeline.eval_batches(cfg.data, tokenizer, cfg.train.eval_steps)
  eval_step = evaluate.make_eval_step(model.graph(cfg.model))
  before = evaluate.mean_loss(eval_step, model.init_params(cfg.model, cfg.train.seed), eval_set)
  assert before["loss"] == pytest.approx(math.log(512), abs=0.3)  # ~uniform at init

  params, last = train.train(cfg, str(tmp_path))
  again = evaluate.mean_loss(eval_step, params, eval_set)  # the returned params are the final ones
  assert again == pytest.approx({k: last[f"eval_{k}"] for k in again})
  assert last["eval_tokens"] == before["tokens"] > 8 * 16 * 60
  assert last["eval_loss"] < before["loss"] - 1.5, (before, last)
  assert last["loss"] < 4.8

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == [20, 40, 60, 80]
  assert [r["step"] for r in eval_rows] == [40, 80]
  assert eval_rows[1]["eval_loss"] < eval_rows[0]["eval_loss"]
  assert train_rows[-1]["tokens_seen"] == 80 * 16 * 64
  for key in ("loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
    assert key in train_rows[-1]
  assert train_rows[-1]["perplexity"] == pytest.approx(math.exp(train_rows[-1]["loss"]))
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  assert train_rows[0]["lr"] == pytest.approx(float(schedule(19)))
  assert os.listdir(tmp_path / "tb")


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(sample_dir, tokenizer_path):
  cfg = tiny_config(sample_dir, tokenizer_path)
  batch = next(pipeline.train_batches(cfg.data, load_tokenizer(str(tokenizer_path))))
  batch["loss_mask"][3, 10:] = 0.0  # uneven token counts across micro-batches
  results = []
  for accum in (1, 4):
    cfg.optim.grad_accum = accum
    graphdef = model.graph(cfg.model)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    params = model.init_params(cfg.model, 0)
    state = step_lib.init_state(params, tx.init(params), seed=0)
    step = step_lib.make_train_step(cfg, graphdef, tx, optim.lr_schedule(cfg.optim, 80))
    state, metrics = step(state, jax.device_put(batch))
    results.append((metrics, state.params))
  (m1, p1), (m4, p4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def run_cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "nanollama_jax.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_writes_the_workdir(sample_dir, tmp_path):
  workdir = tmp_path / "run"
  args = [  # a relative workdir, as a user types it
    "--config", os.path.join(REPO, "configs/tinystories_cpu.py"), "--workdir", "run",
    "--config.data.source=files",
    f"--config.data.train_files={sample_dir / 'train.jsonl'}",
    f"--config.data.eval_files={sample_dir / 'validation.jsonl'}",
    "--config.model.vocab_size=384", "--config.model.dim=32", "--config.model.n_layers=1",
    "--config.model.n_heads=2", "--config.model.n_kv_heads=1", "--config.model.ffn_dim=64",
    "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.data.tokenizer_train_docs=300", "--config.train.steps=4",
    "--config.train.log_every=2", "--config.train.eval_every=4", "--config.train.eval_steps=2",
    "--config.optim.warmup_steps=1",
  ]
  proc = run_cli(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["dim"] == 32 and saved["data"]["seq_len"] == 32
  assert load_tokenizer(str(workdir / "tokenizer.model")).vocab_size == 384  # trained for this run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 4]
  assert "eval_loss" in rows[2] and rows[2]["eval_loss"] > 0
  assert "step 4/4" in proc.stderr
  assert "| step | train loss | train perplexity | validation loss" in proc.stderr  # the summary
  assert "step 4 sample: 'Once upon a time" in proc.stderr  # the recipe samples stories
  assert os.listdir(workdir / "checkpoints") == ["4"]

  # A second run finds the run finished in its checkpoint: it reuses the tokenizer, trains
  # nothing and keeps the metrics.
  mtime = os.path.getmtime(workdir / "tokenizer.model")
  proc = run_cli(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getmtime(workdir / "tokenizer.model") == mtime
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3


SMALL = ["--config.model.vocab_size=384", "--config.model.dim=32", "--config.model.n_layers=1",
         "--config.model.n_heads=2", "--config.model.n_kv_heads=1", "--config.model.ffn_dim=64",
         "--config.data.seq_len=32", "--config.data.batch_size=8",
         "--config.data.tokenizer_train_docs=300", "--config.train.steps=2",
         "--config.train.eval_steps=1", "--config.train.sample_tokens=0",
         "--config.optim.warmup_steps=1"]


@pytest.mark.slow
def test_user_mistakes_end_in_one_line_with_exit_code_2(sample_dir, tmp_path):
  """Each mistake a new user makes prints one `config error:`/`data error:` line, no traceback."""
  (tmp_path / "story.jsonl").write_text('{"story": "Once upon a time"}\n')
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n\xff\xfe\n")
  (tmp_path / "blank.jsonl").write_text("\n\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n  pass\n")
  gpt2 = tmp_path / "gpt2"  # a Hugging Face directory of another architecture
  gpt2.mkdir()
  (gpt2 / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
  (gpt2 / "model.safetensors").write_bytes(b"")
  cpu = os.path.join(REPO, "configs/tinystories_cpu.py")
  files = ["--config.data.source=files", f"--config.data.eval_files={sample_dir / 'validation.jsonl'}"]
  cases = {
    "config error: unknown config key 'model.no_such_key'; did you mean model.": [
      "--config", cpu, "--config.model.no_such_key=3"],
    "config error: unknown config key 'model.n_layer'; did you mean model.n_layers": [
      "--config", cpu, "--config.model.n_layer=3"],
    "config error: --config configs/nope.py: no such file": ["--config", "configs/nope.py"],
    "config error: model.n_kv_heads=3: must divide model.n_heads=8": [
      "--config", os.path.join(REPO, "configs/tinystories.py"), "--config.model.n_kv_heads=3"],
    "data error: story.jsonl, line 1: no field 'text' (data.text_key); the record has ['story']": [
      "--config", cpu, *files, "--config.data.train_files=story.jsonl"],
    "data error: latin1.txt: no training document to read (skipped 2 lines that are not UTF-8)": [
      "--config", cpu, *files, "--config.data.train_files=latin1.txt"],
    "data error: blank.jsonl: no training document to read": [
      "--config", cpu, *files, "--config.data.train_files=blank.jsonl"],
    "config error: broken.py, line 1: SyntaxError: invalid syntax": ["--config", "broken.py"],
    # Gets as far as the tokenizer, so in a workdir of its own (the absl flag's last value).
    "checkpoint error: not a Llama model: model_type='gpt2'": [
      "--config", cpu, *files, f"--config.data.train_files={sample_dir / 'train.jsonl'}",
      *SMALL, f"--config.train.init_from={gpt2}", "--workdir", "gpt2_run"],
  }
  # Each in a workdir of its own: they run at once, and a workdir holds one run at a time.
  procs = {expected: subprocess.Popen(
    [sys.executable, "-m", "nanollama_jax.train", "--workdir", f"run{i}", *args], cwd=tmp_path,
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i, (expected, args) in enumerate(cases.items())}
  for expected, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stderr[-2000:]
    assert lines[-1].startswith(expected), stderr[-2000:]
    assert "Traceback" not in stderr and len(lines) <= 3, stderr[-2000:]
  # No run started: no workdir left behind.
  assert not [p for p in os.listdir(tmp_path) if p.startswith(("run", "gpt2_run"))]
  help_ = run_cli("--help", cwd=tmp_path)
  assert help_.returncode == 0 and "nanollama_jax/config.py" in help_.stdout
  assert "--config.train.steps=200" in help_.stdout


@pytest.mark.slow
def test_no_network_fails_at_once_naming_the_offline_command_which_works(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:  # a port nothing listens on stands for the unreachable Hub
    s.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
  env = {**os.environ, "HF_ENDPOINT": endpoint}
  args = ["--config", "configs/tinystories_cpu.py", "--workdir", str(tmp_path / "ts"), *SMALL]
  proc = subprocess.run([sys.executable, "-m", "nanollama_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 75, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  message, command = proc.stderr.strip().splitlines()[-2:]
  assert message.startswith(f"network error: cannot reach the Hugging Face Hub at {endpoint} to "
                            "read 'roneneldan/TinyStories'")
  assert not os.path.exists(tmp_path / "ts")  # nothing a later command could take for a run
  assert command.startswith("  python -m nanollama_jax.train --config configs/tinystories_cpu.py")
  assert "--config.data.train_files=nanollama_jax/data/tinystories_sample/train.jsonl" in command
  assert "--config.model.dim=32" in command  # the user's own overrides are kept
  # The offline command, exactly as printed, trains on the shipped sample.
  argv = shlex.split(command)
  assert argv[0] == "python"
  ran = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert ran.returncode == 0, ran.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "ts" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 2 and rows[-1]["eval_loss"] > 0


@pytest.mark.slow
def test_published_recipe_compiles_and_donates_its_state():
  """The TinyStories GPU recipe compiles ahead of time on abstract inputs (no arrays built)."""
  cfg = runpy.run_path("configs/tinystories.py")["get_config"]()
  graphdef = model.graph(cfg.model)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  params = model.abstract_params(cfg.model)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx.init(p), seed=0), params)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32)
  step = step_lib.make_train_step(cfg, graphdef, tx, optim.lr_schedule(cfg.optim, cfg.train.steps))
  memory = step.lower(state, batch).compile().memory_analysis()
  state_bytes = 49_849_344 * 4 * 3  # float32 parameters, Adam's mu and nu
  batch_bytes = 5 * 128 * 128 * 4
  # What remains are the counters (step, bad-step run and total, Adam's and the schedule's
  # counts) and the RNG key.
  assert 0 <= memory.argument_size_in_bytes - state_bytes - batch_bytes <= 64
  assert memory.alias_size_in_bytes >= state_bytes  # the new state reuses the old one's buffers


@pytest.mark.slow
def test_epochs_samples_and_progress_are_reported(sample_dir, tokenizer_path, tmp_path, caplog):
  docs = (sample_dir / "train.jsonl").read_text().splitlines()[:60]
  (tmp_path / "small.jsonl").write_text("\n".join(docs) + "\n")
  cfg = tiny_config(sample_dir, tokenizer_path, steps=16, log_every=4, eval_every=16,
                    eval_steps=2, sample_tokens=8, sample_prompts="Once upon a time|Tom")
  cfg.data.train_files = str(tmp_path / "small.jsonl")
  cfg.optim.warmup_steps = 2
  tok = load_tokenizer(str(tokenizer_path))
  epoch_tokens = sum(len(tok.encode(json.loads(d)["text"])) + 2 for d in docs)
  steps_per_epoch = epoch_tokens / (16 * 64)
  with caplog.at_level("INFO"):
    train.train(cfg, str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  epochs = [r["epoch"] for r in rows if "epoch" in r]
  assert epochs == [0, 0, 0, 1] and 12 < steps_per_epoch < 16
  boundary = [r.getMessage() for r in caplog.records if "complete after step" in r.getMessage()]
  assert len(boundary) == 1
  assert f"epoch 0 of {tmp_path / 'small.jsonl'} complete after step {int(steps_per_epoch)}" \
         in boundary[0]
  assert "| step | train loss |" in boundary[0]
  samples = [r.getMessage() for r in caplog.records if "sample:" in r.getMessage()]
  assert len(samples) == 2
  assert samples[0].startswith("step 16 sample: 'Once upon a time") and "sample: 'Tom" in samples[1]
  events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tb").iterdir())
  assert b"Once upon a time" in events and b"samples" in events


@pytest.mark.slow
def test_a_mixture_with_a_hub_source_trains_and_resumes_exactly(sample_dir, tokenizer_path,
                                                                 tmp_path, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  hub = tmp_path / "hub_dataset"  # read through `datasets`, as a Hub dataset is
  hub.mkdir()
  (hub / "part-0.jsonl").write_text((sample_dir / "validation.jsonl").read_text())
  cfg = tiny_config(sample_dir, tokenizer_path, steps=8, log_every=1, ckpt_every=4,
                    eval_every=8, eval_steps=2)
  cfg.data.mixture = f"{sample_dir / 'train.jsonl'}=0.6;hf:{hub}=0.4"
  cfg.optim.warmup_steps = 2
  workdir = tmp_path / "run"
  train.train(cfg, str(workdir))
  first = (workdir / "metrics.jsonl").read_text().splitlines()
  shutil.rmtree(workdir / "checkpoints" / "8")  # as if the run had died after step 4's save
  train.train(cfg, str(workdir))  # resumes from step 4, both sources at their saved positions
  again = (workdir / "metrics.jsonl").read_text().splitlines()
  losses = [[json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]
            for rows in (first, again)]
  assert len(losses[0]) == 8 and losses[1] == losses[0]  # bitwise the same steps 5 to 8


def test_a_hook_runs_every_n_steps_and_after_the_last():
  def due(hook):
    return [done for done in range(1, 11) if hook.due(done, 10)]
  assert due(train.Hook("eval", 3, print)) == [3, 6, 9, 10]
  assert due(train.Hook("save", 0, print)) == [10]  # every=0: only at the end
  assert due(train.Hook("poll", 4, print, at_end=False)) == [4, 8]


def test_step_metrics_reach_the_host_one_step_late():
  pending = train.PendingMetrics()
  assert pending.swap(1, {"loss": jnp.float32(3.5)}) == []  # nothing read at the first step
  [(done, values)] = pending.swap(2, {"loss": jnp.float32(3.25)})
  assert (done, float(values["loss"])) == (1, 3.5)
  [(done, values)] = pending.flush()  # before a hook: read now
  assert (done, float(values["loss"])) == (2, 3.25)
  assert pending.flush() == []

"""Checkpoints under real failures: kill -9, SIGTERM, damaged files, NaN batches, other meshes."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import REPO
from nanollama_jax import checkpoint, config, errors, init_from, model, optim, sharding, train
from nanollama_jax.data import pipeline
from nanollama_jax import step as step_lib


def small_config(sample_dir, tokenizer_path, **train_overrides):
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                        ffn_dim=64, max_seq_len=32))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"), eval_files="",
                       tokenizer=str(tokenizer_path), seq_len=32, batch_size=8))
  cfg.optim.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=2))
  cfg.train.update(dict(steps=12, log_every=1, ckpt_every=4, keep_ckpts=3))
  cfg.train.update(train_overrides)
  return cfg


def cli_args(cfg, workdir):
  """The command line that trains `cfg` (a config differing from the defaults in leaf values)."""
  args = [sys.executable, "-m", "nanollama_jax.train", "--config",
          os.path.join(REPO, "configs", "tinystories_cpu.py"), "--workdir", str(workdir)]
  for group, fields in cfg.to_dict().items():
    for key, value in fields.items():
      if isinstance(value, dict) or value is None:
        continue
      args.append(f"--config.{group}.{key}={value}")
  return args


def start(cfg, workdir):
  return subprocess.Popen(cli_args(cfg, workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def logged_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for(predicate, proc, timeout=120.0):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended first (code {proc.returncode}):\n"
                           f"{proc.stderr.read()[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.005)


def last_logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0
  except (FileNotFoundError, ValueError):
    return 0


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_losses(sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=120, ckpt_every=20)
  train.train(cfg, str(tmp_path / "reference"))
  reference = logged_losses(tmp_path / "reference")
  assert sorted(reference) == list(range(1, 121))

  workdir = tmp_path / "killed"
  proc = start(cfg, workdir)
  # Kill after the first checkpoint is complete and a few more steps are done.
  wait_for(lambda: checkpoint.steps_on_disk(str(workdir)) and last_logged_step(workdir) >= 30,
           proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  killed_at = last_logged_step(workdir)
  saved = checkpoint.steps_on_disk(str(workdir))
  assert killed_at < 120 and saved and saved[-1] <= killed_at

  resumed = subprocess.run(cli_args(cfg, workdir), cwd=REPO, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from {workdir / 'checkpoints'}/{saved[-1]}" in resumed.stderr
  # The killed run's lease was left behind; its process is gone, so it was taken over at once.
  assert f"its process {proc.pid} no longer runs on this host" in resumed.stderr
  losses = logged_losses(workdir)
  assert sorted(losses) == list(range(1, 121))  # the rows after the checkpoint were replaced
  assert losses == reference  # bitwise: JSON keeps every bit of a float
  assert checkpoint.steps_on_disk(str(workdir)) == [80, 100, 120]  # keep_ckpts=3


@pytest.mark.slow
def test_sigterm_saves_the_step_it_reached_and_exits(sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=100000, ckpt_every=0)
  proc = start(cfg, tmp_path)
  wait_for(lambda: last_logged_step(tmp_path) >= 5, proc)
  # A second run of the same command while this one trains stops at once, naming the holder.
  second = subprocess.run(cli_args(cfg, tmp_path), cwd=REPO, capture_output=True, text=True)
  assert second.returncode == 2
  assert second.stderr.strip().splitlines()[-1].startswith(
    f"usage error: the workdir {tmp_path} is in use by another run (host "
    f"{socket.gethostname()}, pid {proc.pid}, 1 process(es), started ")
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  saved = checkpoint.steps_on_disk(str(tmp_path))
  assert len(saved) == 1 and saved[0] >= 5  # ckpt_every=0: only the preemption save
  assert f"SIGTERM received: stopped after step {saved[0]} with a checkpoint" in stderr
  assert "Traceback" not in stderr
  assert last_logged_step(tmp_path) == saved[0]  # the step it stopped at was logged
  assert not os.path.exists(tmp_path / "lease.json")  # given back


def make_run(cfg, workdir):
  """Trains `cfg` in `workdir` and returns its logged losses."""
  train.train(cfg, str(workdir))
  return logged_losses(workdir)


def largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_previous_one_used(
    sample_dir, tokenizer_path, tmp_path, caplog):
  cfg = small_config(sample_dir, tokenizer_path)
  losses = make_run(cfg, tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  assert checkpoint.steps_on_disk(str(tmp_path)) == [4, 8, 12]

  # Truncate the biggest array file of step 12 and delete the manifest of step 8.
  path = largest_data_file(ckpt_dir / "12")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  os.remove(ckpt_dir / "8" / "opt_state" / "manifest.ocdbt")
  # A save killed half-way leaves a temporary folder behind, which is never read.
  shutil.copytree(ckpt_dir / "4", ckpt_dir / "16.orbax-checkpoint-tmp-1700000000")

  with caplog.at_level("WARNING"):
    resumed = make_run(cfg, tmp_path)  # the same command again
  text = caplog.text
  assert "checkpoint" in text and "12 is damaged" in text and "8 is damaged" in text
  assert "resuming from step 4 instead: 2 newer checkpoint(s) were damaged" in text
  assert "a save that did not finish" in text
  assert not os.path.exists(ckpt_dir / "16.orbax-checkpoint-tmp-1700000000")
  assert sorted(os.listdir(tmp_path / "checkpoints_damaged"))[0].startswith("12-")
  assert len(os.listdir(tmp_path / "checkpoints_damaged")) == 2
  # Steps 5..12 were trained again from step 4 and gave the same losses as the first time.
  assert resumed == losses
  assert checkpoint.steps_on_disk(str(tmp_path)) == [4, 8, 12]


@pytest.mark.slow
def test_values_that_read_back_different_are_caught_by_the_fingerprint(
    sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=8)
  make_run(cfg, tmp_path)
  # Make the record of step 8 disagree with its arrays, as a flipped bit on disk would.
  meta_path = tmp_path / "checkpoints" / "8" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  key = sorted(meta["fingerprint"])[0]
  meta["fingerprint"][key] ^= 1
  meta_path.write_text(json.dumps(meta))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  params = model.abstract_params(cfg.model)
  restored = ckpt.restore(sharding.abstract(params, _one_device()),
                          sharding.abstract(jax.eval_shape(tx.init, params), _one_device()),
                          cfg.model)
  ckpt.close()
  assert restored.step == 4 and restored.meta.step == 4
  assert checkpoint.steps_on_disk(str(tmp_path)) == [4]


@pytest.mark.slow
def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(sample_dir, tokenizer_path,
                                                                tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=4)
  make_run(cfg, tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "4" / "params")
  with pytest.raises(errors.CheckpointError, match="none of the checkpoints"):
    train.train(cfg, str(tmp_path))


def test_a_changed_model_shape_is_refused_by_name(sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=4)
  make_run(cfg, tmp_path)
  cfg.model.dim, cfg.model.ffn_dim = 48, 96
  with pytest.raises(errors.CheckpointError,
                     match=r"model.dim: 32 -> 48; model.ffn_dim: 64 -> 96"):
    train.train(cfg, str(tmp_path))


@pytest.mark.slow
def test_raising_steps_extends_a_finished_run(sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=8)
  first = make_run(cfg, tmp_path)
  params, last = train.train(cfg, str(tmp_path))  # finished: nothing to do
  assert last == {} and logged_losses(tmp_path) == first
  cfg.train.steps = 10
  extended = make_run(cfg, tmp_path)
  assert sorted(extended) == list(range(1, 11))
  assert {s: extended[s] for s in first} == first
  assert checkpoint.steps_on_disk(str(tmp_path))[-1] == 10


def poison(batches, steps):
  """Yields `batches` with a NaN in the loss mask of the given (1-based) steps."""

  class Poisoned:
    def __init__(self):
      self.n = 0

    def __iter__(self):
      return self

    def __next__(self):
      self.n += 1
      batch = next(batches)
      if self.n in steps:
        batch["loss_mask"] = batch["loss_mask"].copy()
        batch["loss_mask"][0, 0] = np.nan
      return batch

    def get_state(self, streams=None):
      return batches.get_state(streams)

    def set_state(self, state):
      batches.set_state(state)

    def close(self):
      batches.close()

    def __getattr__(self, name):  # epochs, padding: as the real iterator's
      return getattr(batches, name)

  return Poisoned()


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_training_goes_on(sample_dir, tokenizer_path, tmp_path,
                                                     monkeypatch):
  cfg = small_config(sample_dir, tokenizer_path, steps=8)
  clean = make_run(cfg, tmp_path / "clean")
  real = pipeline.train_batches
  monkeypatch.setattr(pipeline, "train_batches", lambda *a: poison(real(*a), {3}))
  make_run(cfg, tmp_path / "poisoned")
  rows = [json.loads(line) for line in open(tmp_path / "poisoned" / "metrics.jsonl")]
  by_step = {r["step"]: r for r in rows}
  assert np.isnan(by_step[3]["loss"]) and by_step[3]["skipped_steps"] == 1
  assert by_step[2]["skipped_steps"] == 0 and by_step[8]["skipped_steps"] == 1
  assert by_step[1]["loss"] == clean[1] and by_step[2]["loss"] == clean[2]
  # Step 4 starts from the parameters after step 2 (step 3 changed nothing) but sees batch 4.
  assert all(np.isfinite(by_step[s]["loss"]) for s in (4, 5, 6, 7, 8))
  assert by_step[4]["loss"] != clean[4]
  meta = json.loads((tmp_path / "poisoned" / "checkpoints" / "8" / "meta" / "metadata")
                    .read_text())
  assert meta["skipped"] == 1 and meta["bad_run"] == 0


def test_a_run_of_nan_batches_stops_naming_the_step(sample_dir, tokenizer_path, tmp_path,
                                                    monkeypatch):
  cfg = small_config(sample_dir, tokenizer_path, steps=12, max_bad_steps=3)
  real = pipeline.train_batches
  monkeypatch.setattr(pipeline, "train_batches", lambda *a: poison(real(*a), {6, 7, 8, 9}))
  with pytest.raises(errors.TrainingError, match="3 non-finite steps in a row, the last at step 8"
                     r".*newest checkpoint is step 4"):
    train.train(cfg, str(tmp_path))
  assert checkpoint.steps_on_disk(str(tmp_path)) == [4]


@pytest.mark.slow
def test_skipped_update_leaves_the_state_unchanged(sample_dir, tokenizer_path):
  cfg = small_config(sample_dir, tokenizer_path)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  params = model.init_params(cfg.model, 0)
  state = step_lib.init_state(params, tx.init(params), seed=0)
  before = jax.device_get(state)
  step = step_lib.make_train_step(cfg, model.graph(cfg.model), tx,
                               optim.lr_schedule(cfg.optim, cfg.train.steps))
  from nanollama_jax.data.tokenizer_source import load as load_tokenizer
  batch = next(poison(pipeline.train_batches(cfg.data, load_tokenizer(str(tokenizer_path))), {1}))
  state, metrics = step(state, batch)
  after = jax.device_get(state)
  assert int(metrics["skipped"]) == 1 and int(after.step) == 1
  assert int(after.bad_run) == 1 and int(after.skipped) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)


def _one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _spec(shape, axes, mesh):
  """Shards each dimension on the first unused mesh axis that divides it."""
  spec, used = [], set()
  for size in shape:
    axis = next((a for a in axes if a not in used and size % mesh.shape[a] == 0), None)
    spec.append(axis)
    used.add(axis)
  return P(*spec)


@pytest.mark.slow
def test_a_checkpoint_saved_on_8_devices_restores_onto_other_meshes(sample_dir, tokenizer_path,
                                                                    tmp_path):
  cfg = small_config(sample_dir, tokenizer_path)
  cfg.model.update(dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128))
  tx = optim.make_optimizer(cfg.optim, 10)
  params = model.init_params(cfg.model, 0)
  opt_state = tx.init(params)
  fsdp = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))

  def place(tree, mesh, axes):
    return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, _spec(x.shape, axes, mesh))), tree)

  sharded_params = place(params, fsdp, ("fsdp",))
  assert sharded_params["embed_VxD"].sharding.spec == P("fsdp", None)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  data_state = {"streams": 1, "positions": {"0": {"position": 3}}}
  ckpt.save(sharded_params, place(opt_state, fsdp, ("fsdp",)), data_state,
            checkpoint.Meta(step=7, tokens_seen=0), config.to_json(cfg))
  ckpt.wait()

  grid = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
  for target_mesh, axes in ((None, ()), (grid, ("tensor", "data"))):
    def target(tree, target_mesh=target_mesh, axes=axes):
      if target_mesh is None:
        return sharding.abstract(tree, _one_device())
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(target_mesh, _spec(x.shape, axes, target_mesh))),
        tree)

    restored = ckpt.restore(target(params), target(opt_state), cfg.model)
    assert restored.step == 7 and restored.data_state == data_state
    for want, got, t in zip(jax.tree.leaves((params, opt_state)),
                            jax.tree.leaves((restored.params, restored.opt_state)),
                            jax.tree.leaves((target(params), target(opt_state)))):
      assert got.sharding == t.sharding
      np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
  # The last target really splits arrays over both axes of the 2 x 4 mesh.
  assert restored.params["layers"]["attn"]["wq_DxHxE"].sharding.spec == P(
    "data", "tensor", None, None)
  ckpt.close()


@pytest.mark.slow
def test_init_from_loads_parameters_only(sample_dir, tokenizer_path, tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=8)
  trained, _ = train.train(cfg, str(tmp_path / "a"))
  abstract = sharding.abstract(model.abstract_params(cfg.model),
                                      _one_device())
  for path in (tmp_path / "a", tmp_path / "a" / "checkpoints",
               tmp_path / "a" / "checkpoints" / "8"):
    loaded, step = init_from.load_params(str(path), abstract, cfg.model)
    assert step == 8
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  fresh = make_run(small_config(sample_dir, tokenizer_path, steps=4), tmp_path / "fresh")
  warm = make_run(small_config(sample_dir, tokenizer_path, steps=4,
                               init_from=str(tmp_path / "a")), tmp_path / "b")
  assert warm[1] < fresh[1] - 0.3  # it starts from the trained weights
  assert checkpoint.steps_on_disk(str(tmp_path / "b")) == [4]  # its own step count
  meta = json.loads((tmp_path / "b" / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["tokens_seen"] == 4 * 8 * 32


def test_unwritable_workdir_and_full_disk_are_reported_before_training(
    sample_dir, tokenizer_path, tmp_path, monkeypatch):
  cfg = small_config(sample_dir, tokenizer_path, steps=4)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(errors.CheckpointError, match="not writable"):
    train.train(cfg, str(blocker / "run"))

  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda path: usage._replace(free=1000))
  with pytest.raises(errors.CheckpointError, match=r"iB free under .* one checkpoint takes"):
    train.train(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def _allocated(path) -> int:
  """Bytes a directory takes on its disk (whole blocks), as a small filesystem counts them."""
  return sum(os.stat(os.path.join(root, name)).st_blocks * 512
             for root, _, names in os.walk(path) for name in names)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small filesystem (tmpfs) needs root")
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(sample_dir, tokenizer_path,
                                                                 tmp_path):
  cfg = small_config(sample_dir, tokenizer_path, steps=16, keep_ckpts=3)
  reference = make_run(cfg, tmp_path / "reference")
  one = _allocated(tmp_path / "reference" / "checkpoints" / "16")
  rest = _allocated(tmp_path / "reference") - 3 * one
  small = tmp_path / "small"
  small.mkdir()
  # Room for the run's other files and two and a half checkpoints: steps 4 and 8 are saved,
  # the save of step 12 runs out of space.
  size = rest + 5 * one // 2
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)]
                    ).returncode:
    pytest.skip("this machine does not let us mount a tmpfs")
  try:
    done = subprocess.run(cli_args(cfg, small / "run"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"checkpoint error: the disk of {small / 'run'} is full: checkpoint "
                           "12 could not be written and was removed (a checkpoint takes "), last
    assert "the newest complete checkpoint is step 8; rerunning the same command resumes from " \
           "it once there is room" in last
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert sorted(os.listdir(small / "run" / "checkpoints")) == ["4", "8"]  # no half-written 12
    # With room again, the same command resumes from step 8 with the uninterrupted losses.
    subprocess.run(["mount", "-o", f"remount,size={8 * size}", str(small)], check=True)
    again = subprocess.run(cli_args(cfg, small / "run"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert logged_losses(small / "run") == reference
  finally:
    subprocess.run(["umount", "-l", str(small)], check=False)

"""gs:// workdirs against a Cloud Storage emulator (gcs_emulator.py): the path layer and the metrics
writer in a bucket; and end to end, a run that writes its files to the bucket, is killed with
SIGKILL after a checkpoint, resumes from the bucket with the losses of an uninterrupted local run,
and is read from the bucket by the scripts."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcp_storage_emulator", reason="the Cloud Storage emulator is not installed "
                    "(pip install -e '.[test]')")
pytest.importorskip("gcsfs", reason="the gcs extra is not installed (pip install -e '.[gcs]')")
pytest.importorskip("google.cloud.storage",
                    reason="the gcs extra is not installed (pip install -e '.[gcs]')")

import gcs_emulator  # noqa: E402
from helpers import REPO, run_script  # noqa: E402
from nanollama_jax import checkpoint, evaluate, export, generate, paths, train  # noqa: E402
from nanollama_jax import workdir as workdir_lib  # noqa: E402
from nanollama_jax.data import spm_tokenizer  # noqa: E402
from nanollama_jax.data.tokenizer_source import workdir_tokenizer  # noqa: E402
from test_checkpoint import cli_args, small_config  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

STEPS, CKPT_EVERY, KEEP = 40, 8, 3
RUN = "run"  # the run's prefix in the bucket


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.running("nanollama-test") as emulator:
    yield emulator


def _scalars(events: bytes, tag: str) -> dict[int, float]:
  """{step: value} of the scalar `tag` in TensorBoard event records (TFRecord framing: length,
  its CRC, the Event proto, its CRC)."""
  found, at = {}, 0
  while at < len(events):
    (length,) = struct.unpack_from("<Q", events, at)
    event = event_pb2.Event.FromString(events[at + 12:at + 12 + length])
    at += 12 + length + 4
    found.update((event.step, v.simple_value) for v in event.summary.value if v.tag == tag)
  return found


# Run in a process of its own: gcsfs picks its filesystem class for good when it is imported, and
# this process imported it before the emulator's variables could be set (gcs_emulator.py).
_IN_A_BUCKET = """
import json, sys
from nanollama_jax import paths, tracking
run = sys.argv[1]
assert paths.listdir(run) == [] and not paths.isdir(run)  # missing: nothing, not an error
paths.write(f"{run}/config.json", '{"a": 1}')
paths.write(f"{run}/checkpoints/4/params/d", b"\\x00\\x01")
assert paths.listdir(run) == ["checkpoints", "config.json"]
assert paths.isdir(f"{run}/checkpoints") and not paths.isdir(f"{run}/config.json")
paths.write(f"{run}/config.json", '{"a": 2}')  # replaced whole
assert json.loads(paths.read_text(f"{run}/config.json")) == {"a": 2}
paths.move(f"{run}/checkpoints/4", f"{run}/checkpoints_damaged/4-1")  # a damaged one set aside
assert paths.listdir(run) == ["checkpoints_damaged", "config.json"]
assert paths.read_bytes(f"{run}/checkpoints_damaged/4-1/params/d") == b"\\x00\\x01"
paths.remove(f"{run}/checkpoints_damaged")
paths.remove(f"{run}/checkpoints_damaged")  # already gone: fine
writer = tracking.Trackers([tracking.Jsonl(run), tracking.TensorBoard(run)])
for step in (1, 2, 3):
  writer.log(step, {"loss": 1.0 / step})
assert paths.read_text(f"{run}/metrics.jsonl") == ""  # not rewritten for each row
writer.flush()
assert [json.loads(r)["step"] for r in paths.read_text(f"{run}/metrics.jsonl").splitlines()] == [
  1, 2, 3]
writer.close()
"""


def test_paths_and_metrics_in_a_bucket(gcs):
  out = subprocess.run([sys.executable, "-c", _IN_A_BUCKET, gcs.uri("paths")], cwd=REPO,
                       env={**os.environ, **gcs.env}, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  names = gcs.names("paths")
  assert names[:2] == ["config.json", "metrics.jsonl"] and len(names) == 3
  assert names[2].startswith(f"{workdir_lib.TENSORBOARD}/events.out.tfevents.")
  assert _scalars(gcs.read(f"paths/{names[2]}"), "loss") == pytest.approx({1: 1, 2: 0.5, 3: 1 / 3})


@dataclasses.dataclass(frozen=True)
class KilledAndResumed:
  reference: str  # the uninterrupted run, in a local workdir
  committed: list[int]  # the complete checkpoints in the bucket when the run was killed
  resumed_log: str  # what the resumed run logged


def _committed(gcs) -> list[int]:
  names = gcs.names(f"{RUN}/{workdir_lib.CHECKPOINTS}")
  # orbax marks a step complete in a bucket with <step>/commit_success.txt (each item has its own)
  return sorted(int(n.split("/")[0]) for n in names
                if n.count("/") == 1 and n.endswith("/commit_success.txt"))


@pytest.fixture(scope="module")
def killed_and_resumed(gcs, sample_dir, tokenizer_path, tmp_path_factory):
  """The config trained in a local workdir, and in gs://BUCKET/run killed with SIGKILL once a
  checkpoint is complete there, then resumed by the same command."""
  cfg = small_config(sample_dir, tokenizer_path, steps=STEPS, ckpt_every=CKPT_EVERY,
                     keep_ckpts=KEEP)
  reference = tmp_path_factory.mktemp("reference")
  train.train(cfg, str(reference))
  command, env = cli_args(cfg, gcs.uri(RUN)), {**os.environ, **gcs.env}
  log = tmp_path_factory.mktemp("killed") / "stderr.txt"
  with open(log, "w") as stderr:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 180
    while not _committed(gcs) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    # The run holds the workdir: its lease is in the bucket too.
    held = json.loads(gcs.read(f"{RUN}/{workdir_lib.LEASE}"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert held["pid"] == proc.pid
  assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]  # killed, not ended
  committed = _committed(gcs)
  assert committed and committed[-1] < STEPS, log.read_text()[-3000:]
  resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # The killed run's lease was left in the bucket; its process is gone, so it was taken over.
  assert f"its process {proc.pid} no longer runs on this host" in resumed.stderr
  return KilledAndResumed(str(reference), committed, resumed.stderr)


def _losses(rows):
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _bucket_losses(gcs):
  text = gcs.read(f"{RUN}/{workdir_lib.METRICS}").decode()
  return _losses(workdir_lib.parse_metrics(text))


@pytest.mark.slow
def test_the_run_keeps_every_file_in_the_bucket(gcs, killed_and_resumed, tokenizer_path):
  run = killed_and_resumed
  names = gcs.names(RUN)
  assert {n.split("/")[0] for n in names} == {
    workdir_lib.CONFIG, spm_tokenizer.MODEL_FILE, workdir_lib.METRICS, workdir_lib.TENSORBOARD,
    workdir_lib.CHECKPOINTS}
  assert _committed(gcs) == [STEPS - CKPT_EVERY * i for i in range(KEEP)][::-1]
  assert json.loads(gcs.read(f"{RUN}/{workdir_lib.CONFIG}")) == json.loads(
    paths.read_text(workdir_lib.path(run.reference, workdir_lib.CONFIG)))
  assert gcs.read(f"{RUN}/{spm_tokenizer.MODEL_FILE}") == tokenizer_path.read_bytes()
  # TensorBoard: the resumed run's event file holds its losses, in float32.
  resumed_from = run.committed[-1]
  events = [n for n in names if n.startswith(f"{workdir_lib.TENSORBOARD}/events.out.tfevents.")]
  scalars = {}
  for name in events:
    scalars.update(_scalars(gcs.read(f"{RUN}/{name}"), "loss"))
  reference = _losses(workdir_lib.read_metrics(run.reference))
  assert {s: scalars[s] for s in range(resumed_from + 1, STEPS + 1)} == pytest.approx(
    {s: reference[s] for s in range(resumed_from + 1, STEPS + 1)}, rel=1e-7)


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_bucket_with_the_uninterrupted_losses(gcs,
                                                                            killed_and_resumed):
  run = killed_and_resumed
  resumed_from = run.committed[-1]
  assert f"resuming from {gcs.uri(RUN, workdir_lib.CHECKPOINTS)}/{resumed_from}" in run.resumed_log
  reference = _losses(workdir_lib.read_metrics(run.reference))
  assert sorted(reference) == list(range(1, STEPS + 1))
  losses = _bucket_losses(gcs)
  assert sorted(s for s in losses if s > resumed_from) == list(range(resumed_from + 1, STEPS + 1))
  assert losses == {s: reference[s] for s in losses}  # bitwise: JSON keeps every bit of a float


@pytest.mark.slow
def test_the_rows_before_the_kill_stay_in_the_bucket(gcs, killed_and_resumed):
  assert sorted(_bucket_losses(gcs)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_the_scripts_read_the_run_from_the_bucket(gcs, killed_and_resumed, sample_dir, tmp_path):
  """Perplexity, greedy samples and the export from the bucket equal those of the local run."""
  env, workdir = {**os.environ, **gcs.env}, gcs.uri(RUN)
  cfg, params, step = checkpoint.load_run(killed_and_resumed.reference)
  tok = workdir_tokenizer(killed_and_resumed.reference)
  files = str(sample_dir / "validation.jsonl")

  out = run_script("eval_perplexity.py", "--workdir", workdir, "--files", files,
                   "--max-batches", "2", "--json", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  expected = evaluate.perplexity(cfg, params, tok, files, progress=False, max_batches=2)
  assert json.loads(out.stdout) == {**expected, "step": step}

  out = run_script("generate.py", "--workdir", workdir, "--prompt", "Once upon a time",
                   "--max-new-tokens", "8", "--temperature", "0", "--json", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  ids = generate.generate(cfg.model, params, [[tok.bos_id, *tok.encode("Once upon a time")]], 8,
                          pad_id=tok.pad_id, eos_id=tok.eos_id)[0]
  assert json.loads(out.stdout) == {"step": step, "completions": [
    "Once upon a time" + tok.decode(ids)], "new_tokens": [len(ids)]}

  out = run_script("export_to_pytorch.py", "--workdir", workdir, "--out", str(tmp_path / "gs"),
                   "--json", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  export.save_hf(str(tmp_path / "local"), params, cfg.model, tok)
  for name in sorted(os.listdir(tmp_path / "local")):
    assert (tmp_path / "gs" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name

"""Checkpoints pushed to the Hugging Face Hub while a run trains.

`python -m nanollama_jax.hub --workdir DIR --repo user/name [--step N]` uploads the Hugging Face
export of one checkpoint (safetensors, config, tokenizer, generation config and a model card with
the recipe, tokens seen and the latest losses). The checkpoint is read back from disk and checked
against the fingerprints saved with it: a damaged checkpoint is never pushed.

With `train.push_to_hub`, the trainer runs that command in a separate process (`Pusher`) every
`train.push_every` steps (0: every checkpoint) and at the end: training never waits on the network, a failed
push is a warning, and the next push retries with the newer checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from absl import logging

from nanollama_jax import checkpoint, errors, export, paths
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.data.tokenizer_source import workdir_tokenizer

CHECKPOINT_WAIT_S = 600.0  # how long a push waits for an asynchronous save to finish


def _wait_for_step(workdir: str, step: int, timeout_s: float) -> None:
  """Waits until checkpoint `step` is complete on disk (orbax renames it into place last)."""
  deadline = time.monotonic() + timeout_s
  while step not in checkpoint.steps_on_disk(workdir):
    if time.monotonic() > deadline:
      raise errors.CheckpointError(f"checkpoint {step} did not appear in {workdir} within "
                                   f"{timeout_s:.0f}s")
    time.sleep(1.0)


def _latest_losses(workdir: str, step: int) -> dict[str, float]:
  """The newest train and validation numbers at or before `step`, from metrics.jsonl."""
  return workdir_lib.latest(workdir_lib.read_metrics(workdir),
                            ("loss", "eval_loss", "eval_perplexity", "tokens_seen"), step)


def model_card(repo_id: str, cfg, step: int, latest: dict[str, float]) -> str:
  """The README.md of a pushed checkpoint: what was trained, on what, and how far."""
  model_cfg, data_cfg = cfg.model, cfg.data
  trained_on = (f"Hub dataset `{data_cfg.hf_path}`"
                if data_cfg.source == "hf" and not data_cfg.mixture
                else f"mixture `{data_cfg.mixture}`" if data_cfg.mixture
                else f"files `{data_cfg.train_files}`")
  numbers = [f"- step: {step:,} of {cfg.train.steps:,}"]
  names = {"tokens_seen": "tokens seen", "loss": "train loss", "eval_loss": "validation loss",
           "eval_perplexity": "validation perplexity"}
  for key, name in names.items():
    if key in latest:
      value = latest[key]
      numbers.append(f"- {name}: {value:,}" if key == "tokens_seen" else f"- {name}: {value:.4f}")
  return "\n".join([
    "---", "library_name: transformers", "tags:", "- nanollama_jax", "- llama", "---", "",
    f"# {repo_id}", "",
    "A LLaMA-style model pretrained from scratch with nanollama_jax; this is the Hugging Face",
    "export of one of its checkpoints (load it with `LlamaForCausalLM.from_pretrained`).", "",
    f"- shape: dim {model_cfg.dim}, {model_cfg.n_layers} layers, {model_cfg.n_heads} heads / "
    f"{model_cfg.n_kv_heads} KV heads, FFN {model_cfg.ffn_dim}, vocabulary "
    f"{model_cfg.vocab_size}, context {model_cfg.max_seq_len}",
    f"- data: {trained_on}",
    f"- optimizer: AdamW, peak lr {cfg.optim.lr}, batch {data_cfg.batch_size} x "
    f"{data_cfg.seq_len} tokens", *numbers, "",
  ])


def push(workdir: str, repo_id: str, step: int | None = None, wait_s: float = 0.0) -> str:
  """Uploads the export of checkpoint `step` (default: the newest) of `workdir` to `repo_id`.

  Returns the commit URL. Raises CheckpointError for a missing or damaged checkpoint and
  NetworkError when the Hub refuses or cannot be reached (the token, the repository, the network).
  """
  errors.require(errors.MODULES["hf"], "hf", "pushing to the Hub")
  import huggingface_hub  # pylint: disable=import-outside-toplevel

  if step is not None and wait_s:
    _wait_for_step(workdir, step, wait_s)
  cfg, params, step = checkpoint.load_run(workdir, step)
  with tempfile.TemporaryDirectory(prefix="nanollama-push-") as stage:
    export.save_hf(stage, params, cfg.model, workdir_tokenizer(workdir))
    with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as f:
      f.write(model_card(repo_id, cfg, step, _latest_losses(workdir, step)))
    api = huggingface_hub.HfApi()
    try:
      api.create_repo(repo_id, exist_ok=True, private=True)
      info = api.upload_folder(repo_id=repo_id, folder_path=stage,
                               commit_message=f"step {step} of {os.path.basename(workdir)}")
    except (OSError, ValueError) as e:
      # The Hub's HTTP errors are OSErrors; a malformed repository name is a ValueError.
      raise errors.NetworkError(f"{repo_id}: {type(e).__name__}: {' '.join(str(e).split())[:400]}"
                                ) from e
  return info.commit_url


class Pusher:
  """Pushes checkpoints from a background process, one at a time, never blocking training.

  `request(step)` asks for checkpoint `step` to be pushed; while a push runs, only the newest
  request waits. `poll()` reports a finished push (a warning when it failed) and starts the
  next; `close(wait)` waits for the last one (at the end of a run) or leaves it running.
  """

  def __init__(self, workdir: str, repo_id: str):
    self.workdir, self.repo_id = paths.resolve(workdir), repo_id
    self._running: tuple[int, subprocess.Popen] | None = None
    self._pending: int | None = None
    self.pushed: list[int] = []
    self.failed: list[int] = []

  def request(self, step: int) -> None:
    self._pending = step
    self.poll()

  def poll(self) -> None:
    if self._running is not None:
      step, proc = self._running
      if proc.poll() is None:
        return
      out = proc.stdout.read() if proc.stdout else ""
      self._running = None
      if proc.returncode == 0:
        self.pushed.append(step)
        logging.info("pushed checkpoint %d to the Hub: %s", step, out.strip().splitlines()[-1:])
      else:
        self.failed.append(step)
        reason = (out.strip().splitlines() or ["no output"])[-1]
        logging.warning("push of checkpoint %d to %s failed (%s); the next push retries",
                        step, self.repo_id, reason)
    if self._pending is not None:
      step, self._pending = self._pending, None
      command = [sys.executable, "-m", "nanollama_jax.hub", "--workdir", self.workdir,
                 "--repo", self.repo_id, "--step", str(step), "--wait", str(CHECKPOINT_WAIT_S)]
      env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # reads the checkpoint without a GPU/TPU
      self._running = (step, subprocess.Popen(command, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, env=env))

  def close(self, wait: bool) -> None:
    """With `wait`, finishes the running and pending pushes (the end of a run)."""
    while wait and (self._running is not None or self._pending is not None):
      if self._running is not None:
        logging.info("waiting for the push of checkpoint %d to %s", self._running[0],
                     self.repo_id)
        self._running[1].wait()
      self.poll()


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--repo", required=True, help="the Hub model repository, user/name")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--wait", type=float, default=0.0,
                 help="seconds to wait for the checkpoint to be complete on disk")
  args = p.parse_args(argv)
  print(f"pushed: {push(args.workdir, args.repo, args.step, args.wait)}")


if __name__ == "__main__":
  errors.cli(main)

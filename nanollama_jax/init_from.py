"""Where a run's first parameters come from (`train.init_from`), and what they decide of the run.

`train.init_from` names one of:

  a run of this project     its workdir, its checkpoints/ folder or one checkpoints/<step>
                            folder; the run's config must give the same shape
  a Hugging Face Llama      a local directory (config.json + safetensors: our export, or a
  directory                 published model saved with save_pretrained)
  hf:ORG/NAME[@REVISION]    the same, downloaded from the Hub (HF_TOKEN for gated models)

Published weights decide the model: the run takes the shape, norm epsilon, RoPE (with its
Llama 3.1 scaling) and context of their config.json in place of the recipe's (the log lists what
changed; dtype, attention, remat and the rest stay the recipe's), and their tokenizer unless
data.tokenizer is set. The weights are read at a run's first start only: a run that resumes from
its own checkpoints reads the shape from its workdir and needs neither the directory nor the Hub.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections
from absl import logging

from nanollama_jax import checkpoint, errors, export, hf_files, paths
from nanollama_jax import config as config_lib
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.data import tokenizer_source

# What a published checkpoint's config.json decides of the model.
PUBLISHED_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps",
                  "rope_theta", "rope_scaling", "qk_norm", "tie_embeddings", "max_seq_len")
KEY = "train.init_from"
# The files of a Hugging Face model directory that a run reads.
HUB_FILES = [export.HF_CONFIG, "*.safetensors", "*.safetensors.index.json",
             *tokenizer_source.FILES]


def is_published(spec: str) -> bool:
  """Whether `spec` names Hugging Face weights (hf:... or a local HF directory), not a run."""
  return hf_files.is_hub_name(spec) or config_lib.is_hf_directory(spec)


@functools.lru_cache(maxsize=8)
def local_directory(spec: str) -> str:
  """The local directory of `spec`: downloaded for hf:ORG/NAME (once per process), else `spec`
  itself."""
  if not hf_files.is_hub_name(spec):
    return spec
  hint = ("Without the Hub: download the model's directory elsewhere (config.json, the "
          f"safetensors, the tokenizer files) and set {KEY} to it")
  return hf_files.download(spec, HUB_FILES, KEY, hint)


def resolve_checkpoint(spec: str) -> tuple[str, int]:
  """(checkpoints folder, step) of a run's checkpoint: a workdir, its checkpoints/ folder (the
  newest step of either) or a checkpoints/<step> folder."""
  path = paths.resolve(spec).rstrip("/")
  parent, _, base = path.rpartition("/")
  if base.isdigit() and paths.isdir(paths.join(path, "params")):
    if not checkpoint.finished(path):
      raise errors.CheckpointError(f"{KEY}={path!r}: this checkpoint was not finished (its save "
                                   "was interrupted): use an earlier step")
    return parent, int(base)
  for directory in (paths.join(path, workdir_lib.CHECKPOINTS), path):
    steps = checkpoint.step_dirs(directory)
    if steps:
      return directory, steps[-1]
  raise errors.CheckpointError(
    f"{KEY}={path!r}: no checkpoint found there (looked for "
    f"{paths.join(path, workdir_lib.CHECKPOINTS, '<step>')} and {path}/<step>)")


def run_directory(spec: str) -> str:
  """The workdir of a run's checkpoint `spec` (where its tokenizer is)."""
  directory, _ = resolve_checkpoint(spec)
  parent, _, base = directory.rstrip("/").rpartition("/")
  return parent if base == workdir_lib.CHECKPOINTS else directory


def _apply_shape(cfg: ml_collections.ConfigDict, published: dict[str, Any], where: str) -> None:
  changed = [f"{k}: {cfg.model[k]!r} -> {published[k]!r}" for k in PUBLISHED_KEYS
             if cfg.model[k] != published[k]]
  for k in PUBLISHED_KEYS:
    cfg.model[k] = published[k]
  if changed:
    logging.info("the model takes the shape of %s: %s", where, "; ".join(changed))


def resolve(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`cfg` with what its init_from decides: for published weights, the model's shape and (when
  data.tokenizer is empty) the tokenizer; a run of this project decides nothing. Returns a new
  config; raises ConfigError for weights without a tokenizer or a vocabulary that does not fit.
  """
  spec = cfg.train.init_from
  if not spec or not is_published(spec):
    return cfg
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if checkpoint.steps_on_disk(workdir):  # resuming: the run's own config has the shape
    saved = paths.join(workdir, workdir_lib.CONFIG)
    if paths.exists(saved):
      _apply_shape(cfg, json.loads(paths.read_text(saved))["model"], saved)
    return cfg
  directory = local_directory(spec)
  published = export.model_config_from_hf(
    json.loads(paths.read_text(paths.join(directory, export.HF_CONFIG))))
  _apply_shape(cfg, published, f"{KEY}={spec!r}")
  if not cfg.data.tokenizer and tokenizer_source.load_dir(directory) is None:
    raise errors.ConfigError(f"{KEY}={spec!r} has no tokenizer (tokenizer.json or "
                             "tokenizer.model): set data.tokenizer to the one the weights were "
                             "trained with")
  config_lib.validate(cfg)
  return cfg


def tokenizer_directory(cfg: ml_collections.ConfigDict) -> str:
  """The directory whose tokenizer a run starting from init_from uses when data.tokenizer is
  empty: the weights' own directory, or the workdir of the run they come from; '' for none."""
  spec = cfg.train.init_from
  if not spec:
    return ""
  return local_directory(spec) if is_published(spec) else run_directory(spec)


def load_params(spec: str, abstract_params: Any, model_cfg: Any) -> tuple[Any, int]:
  """Reads only the parameters of `spec`, onto `abstract_params`' shardings; returns them and
  the checkpoint's step (0 for published weights)."""
  where = f"{KEY}={spec!r}"
  if is_published(spec):
    hf_cfg, params = export.load_hf(local_directory(spec))
    checkpoint.refuse_other_shape(hf_cfg.to_dict(), model_cfg, where)
    return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params,
                        abstract_params), 0
  directory, step = resolve_checkpoint(spec)
  return checkpoint.read_params_at(directory, step, abstract_params, model_cfg, where), step

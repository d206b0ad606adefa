"""The config schema: one commented default that recipes in configs/ overlay, and its validation.

Every field a run reads is defined here with its default. Recipes start from
`get_default_config()` and change fields; `validate` rejects anything else before a single array
is compiled, with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

# model.attention: the implementations behind attention.attention() (attention/__init__.py).
ATTENTION_IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn", "save_dots_attn")
DATA_SOURCES = ("files", "hf")
PACKINGS = ("concat", "first_fit")
ROPE_SCALING_KEYS = (
  "factor",
  "low_freq_factor",
  "high_freq_factor",
  "original_max_position_embeddings",
)


class ConfigError(ValueError):
  """A config value that cannot be used, with a message that says how to fix it."""


def get_default_config() -> ml_collections.ConfigDict:
  """Returns the single source of defaults: a small LLaMA on local files, float32."""
  cfg = ml_collections.ConfigDict()

  cfg.model = ml_collections.ConfigDict()
  cfg.model.vocab_size = 32000  # rows of the embedding; >= the tokenizer's vocabulary
  cfg.model.dim = 512  # D, the residual width
  cfg.model.n_layers = 8  # L
  cfg.model.n_heads = 8  # H query heads; head dim = dim // n_heads
  cfg.model.n_kv_heads = 8  # K key/value heads (GQA when K < H); must divide n_heads
  cfg.model.ffn_dim = 1408  # F, the SwiGLU hidden width
  cfg.model.norm_eps = 1e-5
  cfg.model.rope_theta = 10000.0
  # None, or the Llama 3.1 frequency scaling: {"factor": 8.0, "low_freq_factor": 1.0,
  # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
  cfg.model.rope_scaling = None
  cfg.model.qk_norm = False  # RMSNorm over each head of q and k before RoPE
  cfg.model.tie_embeddings = False  # the output projection reuses the token embedding
  cfg.model.max_seq_len = 2048  # the longest sequence the model is meant for
  # One of ATTENTION_IMPLS: xla (any backend), pallas (CUDA GPUs), splash (TPUs), cudnn (NVIDIA
  # GPUs), or auto: pallas on a CUDA GPU, splash on a TPU, xla elsewhere (so xla on a CPU).
  cfg.model.attention = "auto"
  cfg.model.scan_layers = True  # run the layer stack with a scan: compile time flat in depth
  cfg.model.remat = "none"  # one of REMAT_POLICIES, applied to each decoder layer
  cfg.model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU)
  cfg.model.param_dtype = "float32"  # storage dtype of parameters and optimizer state
  cfg.model.init_std = 0.02  # normal init; residual output projections get / sqrt(2 L)

  cfg.data = ml_collections.ConfigDict()
  cfg.data.source = "files"  # "files": local globs below; "hf": a Hugging Face Hub dataset
  cfg.data.hf_path = "roneneldan/TinyStories"
  cfg.data.hf_name = ""  # the dataset's config name, if it has several
  cfg.data.hf_train_split = "train"
  cfg.data.hf_eval_split = "validation"
  cfg.data.hf_data_files = ""  # data_files for loaders such as hf_path="json" (comma-separated)
  cfg.data.hf_streaming = True  # stream records (windowed shuffle); False: download, memory-map
  cfg.data.text_key = "text"  # the field (JSONL, Parquet, Hub column) that holds the document
  # Comma-separated globs of .jsonl/.json (JSON lines), .txt and .parquet files, or of dataset
  # directories written by scripts/prepare_dataset.py (pretokenized shards).
  cfg.data.train_files = ""
  cfg.data.eval_files = ""  # same; empty with source="files" turns evaluation off
  cfg.data.text_separator = ""  # .txt files: "" = one document per line, else the separator
  # A weighted mixture of training sources instead of train_files: "GLOBS=WEIGHT;GLOBS=WEIGHT",
  # e.g. "web/*.parquet=0.7;code/*.jsonl=0.2;shards/instruct=0.1" (weights are shares of
  # training windows; each GLOBS is like train_files). Evaluation still reads eval_files.
  cfg.data.mixture = ""
  cfg.data.tokenizer = ""  # a sentencepiece .model; empty: the shards' own, else train one
  cfg.data.tokenizer_train_docs = 200_000  # documents read to train that tokenizer
  cfg.data.seq_len = 256  # T, tokens per training sequence
  cfg.data.batch_size = 32  # B, global batch in sequences (split evenly over processes)
  cfg.data.packing = "concat"  # one of PACKINGS: concat-and-split, or first_fit (no splits)
  cfg.data.pack_bins = 64  # first_fit: windows filled at once (more: less padding)
  cfg.data.num_workers = 0  # grain worker processes for tokenisation (0: in-process)
  cfg.data.shuffle_seed = 0
  cfg.data.shuffle_window = 10_000  # documents shuffled together when streaming from the Hub

  cfg.optim = ml_collections.ConfigDict()
  cfg.optim.lr = 3e-4  # peak learning rate, reached at the end of warmup
  cfg.optim.min_lr = 3e-5  # the cosine decays to this at the last step
  cfg.optim.warmup_steps = 100
  cfg.optim.weight_decay = 0.1  # AdamW decay, not applied to norms
  cfg.optim.b1 = 0.9
  cfg.optim.b2 = 0.95
  cfg.optim.eps = 1e-8
  cfg.optim.grad_clip = 1.0  # global-norm clipping; 0 turns it off
  cfg.optim.grad_accum = 1  # micro-batches per step; batch_size must divide by it

  cfg.train = ml_collections.ConfigDict()
  cfg.train.steps = 1000
  cfg.train.seed = 0  # parameter initialisation
  cfg.train.log_every = 10
  cfg.train.eval_every = 200
  cfg.train.eval_steps = 20  # batches per evaluation (fewer if the split is smaller)
  # Checkpoints go to WORKDIR/checkpoints/<step>; rerunning the command on the workdir resumes.
  cfg.train.ckpt_every = 500  # steps between saves; 0 saves only at the end (and on SIGTERM)
  cfg.train.keep_ckpts = 3  # the newest N are kept; older ones go once a newer save is complete
  cfg.train.async_checkpoint = True  # write in the background while training goes on
  cfg.train.max_bad_steps = 20  # consecutive non-finite steps (each skipped) before stopping
  # Linux/glibc: malloc keeps freed host memory for reuse (hostmem.py), so XLA:CPU's per-step
  # scratch space is not page-faulted in again every step; on a CPU run, steps ~20% faster.
  cfg.train.keep_host_memory = True
  # Parameters to start from (optimizer and step fresh): a workdir, its checkpoints/ folder,
  # one checkpoints/<step> folder, or a Hugging Face Llama directory (config.json +
  # safetensors). Ignored when the workdir has a checkpoint to resume.
  cfg.train.init_from = ""
  # At each evaluation, greedy continuations of these prompts ("|"-separated) go to the log and
  # to TensorBoard's text tab; sample_tokens=0 turns them off.
  cfg.train.sample_prompts = "Once upon a time|One day, a little"
  cfg.train.sample_tokens = 0

  # The device mesh (see sharding.py): the product of the sizes must be the number of devices;
  # one axis may be -1, taking the devices left. The batch is split over data x fsdp.
  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.data = 1  # replicas
  cfg.mesh.fsdp = -1  # parameters and optimizer state sharded (ZeRO-3 style)
  cfg.mesh.tensor = 1  # heads, MLP and vocabulary split (tensor parallelism)
  return cfg


def head_dim(model: ml_collections.ConfigDict) -> int:
  return model.dim // model.n_heads


def _fail(key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{key}={value!r}: {allowed}")


def _is_group(value: Any) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _all_keys(group: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in group.items():
    keys.append(prefix + key)
    if _is_group(value):
      keys += _all_keys(value, f"{prefix}{key}.")
  return keys


def _unknown_key(name: str) -> ConfigError:
  """The error for a key the schema lacks, naming the closest keys at its depth."""
  group, _, last = name.rpartition(".")
  peers = [k for k in _all_keys(get_default_config()) if k.count(".") == name.count(".")]
  close = difflib.get_close_matches(name, peers, n=3, cutoff=0.6)
  if not close:  # a misspelled field: compare its name with the other fields of its group
    close = [k for k in peers if k.startswith(group + ".")
             and difflib.SequenceMatcher(None, k.rpartition(".")[2], last).ratio() >= 0.5][:3]
  hint = f"did you mean {' or '.join(close)}? " if close else ""
  return ConfigError(f"unknown config key {name!r}; {hint}every field and its default are in "
                     "nanollama_jax/config.py")


def check_key(name: str) -> None:
  """Raises ConfigError (with the closest valid keys) unless `name` ('group.field') exists."""
  value: Any = get_default_config()
  seen = []
  for part in name.split("."):
    if not _is_group(value):  # inside a dict-valued field (rope_scaling): not ours to check
      return
    if part not in value:
      raise _unknown_key(".".join([*seen, part]))
    value, seen = value[part], [*seen, part]


def _check_known_keys(cfg: ml_collections.ConfigDict, default: ml_collections.ConfigDict,
                      prefix: str) -> None:
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in default:
      raise _unknown_key(name)
    if _is_group(default[key]):
      if not _is_group(cfg[key]):
        _fail(name, cfg[key], "must be a group of fields")
      _check_known_keys(cfg[key], default[key], name + ".")


def expand_globs(patterns: str, key: str) -> list[str]:
  """Returns the sorted files matching comma-separated globs; an error names the key if none."""
  files: list[str] = []
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise ConfigError(f"{key}={patterns!r}: no file matches {pattern!r}")
    files.extend(m for m in matches if m not in files)
  if not files:
    raise ConfigError(f"{key} is empty: give one or more comma-separated file globs")
  return files


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """Parses data.mixture, "GLOBS=WEIGHT;GLOBS=WEIGHT", into (globs, weight) pairs."""
  parts = []
  for entry in (e.strip() for e in spec.split(";")):
    if not entry:
      continue
    globs, sep, weight = entry.rpartition("=")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not sep or not globs.strip() or not value > 0:
      raise ConfigError(
        f"data.mixture={spec!r}: entry {entry!r} is not GLOBS=WEIGHT with a weight > 0, "
        "e.g. 'web/*.jsonl=0.7;code/*.jsonl=0.3'")
    parts.append((globs.strip(), value))
  if not parts:
    raise ConfigError(f"data.mixture={spec!r}: no entries")
  return parts


def validate(cfg: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  _check_known_keys(cfg, get_default_config(), "")
  m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

  positive = {
    "model.vocab_size": m.vocab_size,
    "model.dim": m.dim,
    "model.n_layers": m.n_layers,
    "model.n_heads": m.n_heads,
    "model.n_kv_heads": m.n_kv_heads,
    "model.ffn_dim": m.ffn_dim,
    "model.max_seq_len": m.max_seq_len,
    "data.seq_len": d.seq_len,
    "data.batch_size": d.batch_size,
    "data.tokenizer_train_docs": d.tokenizer_train_docs,
    "data.pack_bins": d.pack_bins,
    "data.shuffle_window": d.shuffle_window,
    "optim.grad_accum": o.grad_accum,
    "train.steps": t.steps,
    "train.log_every": t.log_every,
    "train.eval_every": t.eval_every,
    "train.eval_steps": t.eval_steps,
    "train.keep_ckpts": t.keep_ckpts,
    "train.max_bad_steps": t.max_bad_steps,
  }
  for key, value in positive.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(key, value, "must be a positive integer")
  for key, value in {"data.num_workers": d.num_workers, "optim.warmup_steps": o.warmup_steps,
                     "data.shuffle_seed": d.shuffle_seed, "train.seed": t.seed,
                     "train.ckpt_every": t.ckpt_every,
                     "train.sample_tokens": t.sample_tokens}.items():
    if not isinstance(value, int) or value < 0:
      _fail(key, value, "must be an integer >= 0")
  for key, value in {"model.norm_eps": m.norm_eps, "model.rope_theta": m.rope_theta,
                     "model.init_std": m.init_std, "optim.lr": o.lr, "optim.eps": o.eps}.items():
    if not value > 0:
      _fail(key, value, "must be > 0")

  if m.dim % m.n_heads:
    _fail("model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
  if head_dim(m) % 2:
    _fail("model.dim", m.dim,
          f"dim / n_heads = {head_dim(m)} must be even: RoPE rotates pairs of features")
  if m.n_heads % m.n_kv_heads:
    _fail("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
  if m.attention not in ATTENTION_IMPLS:
    _fail("model.attention", m.attention, f"allowed: {', '.join(ATTENTION_IMPLS)}")
  if m.remat not in REMAT_POLICIES:
    _fail("model.remat", m.remat, f"allowed: {', '.join(REMAT_POLICIES)}")
  for key in ("dtype", "param_dtype"):
    if m[key] not in DTYPES:
      _fail(f"model.{key}", m[key], f"allowed: {', '.join(DTYPES)}")
  if m.rope_scaling is not None:
    rs = dict(m.rope_scaling)
    if sorted(rs) != sorted(ROPE_SCALING_KEYS):
      _fail("model.rope_scaling", rs, f"must be None or have exactly the keys {ROPE_SCALING_KEYS}")
    for key in ROPE_SCALING_KEYS:
      if not rs[key] > 0:
        _fail(f"model.rope_scaling.{key}", rs[key], "must be > 0")
    if not rs["high_freq_factor"] > rs["low_freq_factor"]:
      _fail("model.rope_scaling.high_freq_factor", rs["high_freq_factor"],
            f"must be > low_freq_factor={rs['low_freq_factor']}")

  if d.seq_len > m.max_seq_len:
    _fail("data.seq_len", d.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
  if d.source not in DATA_SOURCES:
    _fail("data.source", d.source, f"allowed: {', '.join(DATA_SOURCES)}")
  if d.packing not in PACKINGS:
    _fail("data.packing", d.packing, f"allowed: {', '.join(PACKINGS)}")
  if d.mixture:
    parse_mixture(d.mixture)
  if d.source == "hf" and not d.hf_path:
    _fail("data.hf_path", d.hf_path, "must name a Hub dataset when data.source='hf'")
  if d.batch_size % o.grad_accum:
    _fail("data.batch_size", d.batch_size,
          f"must be divisible by optim.grad_accum={o.grad_accum}")

  if o.min_lr < 0 or o.min_lr > o.lr:
    _fail("optim.min_lr", o.min_lr, f"must be between 0 and optim.lr={o.lr}")
  if o.warmup_steps > t.steps:
    _fail("optim.warmup_steps", o.warmup_steps,
          f"is longer than the run: must be <= train.steps={t.steps}")
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      _fail(f"optim.{key}", o[key], "must be in [0, 1)")
  for key in ("weight_decay", "grad_clip"):
    if o[key] < 0:
      _fail(f"optim.{key}", o[key], "must be >= 0")

  for axis in ("data", "fsdp", "tensor"):
    size = cfg.mesh[axis]
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", size, "must be a positive integer or -1 (the devices left)")
  if [cfg.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    _fail("mesh", cfg.mesh.to_dict(), "at most one axis can be -1")

  if check_files:
    if d.mixture:
      for globs, _ in parse_mixture(d.mixture):
        expand_globs(globs, "data.mixture")
    elif d.source == "files":
      expand_globs(d.train_files, "data.train_files")
      if d.eval_files:
        expand_globs(d.eval_files, "data.eval_files")
    if d.tokenizer and not os.path.isfile(d.tokenizer):
      _fail("data.tokenizer", d.tokenizer, "no such file (leave empty to train one)")
    if t.init_from and not os.path.isdir(t.init_from):
      _fail("train.init_from", t.init_from,
            "no such directory (a workdir, its checkpoints/, a checkpoints/<step> folder or a "
            "Hugging Face Llama directory)")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config written by `to_json`, on top of the defaults so new fields get theirs."""
  cfg = get_default_config()
  for group, fields in json.loads(text).items():
    if group not in cfg:
      raise ConfigError(f"unknown config group {group!r} in the saved config")
    for key, value in fields.items():
      if key not in cfg[group]:
        raise ConfigError(f"unknown config key '{group}.{key}' in the saved config")
      cfg[group][key] = value
  return cfg

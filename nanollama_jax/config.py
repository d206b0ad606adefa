"""The config schema: one commented default that recipes in configs/ overlay, and its validation.

Every field a run reads is defined here with its default. Recipes start from
`get_default_config()` and change fields; `validate` rejects anything else before a single array
is compiled, with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from nanollama_jax import data_spec, errors, hf_files, paths

# model.attention: the implementations behind attention.attention() (attention/__init__.py).
ATTENTION_IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn", "save_dots_attn")
DATA_SOURCES = ("files", "hf")
PACKINGS = ("concat", "first_fit")
CHUNKED_LOSS = ("auto", "on", "off")
FORMATS = ("text", "chat")
WANDB_MODES = ("online", "offline")
ROPE_SCALING_KEYS = (
  "factor",
  "low_freq_factor",
  "high_freq_factor",
  "original_max_position_embeddings",
)



def get_default_config() -> ml_collections.ConfigDict:
  """Returns the single source of defaults: a small LLaMA on local files, float32."""
  cfg = ml_collections.ConfigDict()
  cfg.model = _model_defaults()
  cfg.data = _data_defaults()
  cfg.optim = _optim_defaults()
  cfg.train = _train_defaults()
  cfg.mesh = _mesh_defaults()
  cfg.wandb = _wandb_defaults()
  return cfg


def _model_defaults() -> ml_collections.ConfigDict:
  """The model's shape, numerics and attention implementation."""
  model = ml_collections.ConfigDict()
  model.vocab_size = 32000  # rows of the embedding; >= the tokenizer's vocabulary
  model.dim = 512  # D, the residual width
  model.n_layers = 8  # L
  model.n_heads = 8  # H query heads; head dim = dim // n_heads
  model.n_kv_heads = 8  # K key/value heads (GQA when K < H); must divide n_heads
  model.ffn_dim = 1408  # F, the SwiGLU hidden width
  model.norm_eps = 1e-5
  model.rope_theta = 10000.0
  # None, or the Llama 3.1 frequency scaling: {"factor": 8.0, "low_freq_factor": 1.0,
  # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
  model.rope_scaling = None
  model.qk_norm = False  # RMSNorm over each head of q and k before RoPE
  model.tie_embeddings = False  # the output projection reuses the token embedding
  model.max_seq_len = 2048  # the longest sequence the model is meant for
  # One of ATTENTION_IMPLS: xla (any backend), pallas (CUDA GPUs), splash (TPUs), cudnn (NVIDIA
  # GPUs), or auto: pallas on a CUDA GPU, splash on a TPU, xla elsewhere (so xla on a CPU).
  model.attention = "auto"
  model.scan_layers = True  # run the layer stack with a scan: compile time flat in depth
  model.remat = "none"  # one of REMAT_POLICIES, applied to each decoder layer
  model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU)
  model.param_dtype = "float32"  # storage dtype of parameters and optimizer state
  model.init_std = 0.02  # normal init; residual output projections get / sqrt(2 L)
  # The output layer and loss in chunks of positions (a custom VJP), so the float32 logits and
  # their gradient never exist whole: "on", "off", or "auto" (on for vocabularies >= 16,384).
  model.chunked_loss = "auto"
  model.loss_chunk_len = 256  # positions per chunk when chunked
  return model


def _data_defaults() -> ml_collections.ConfigDict:
  """Where the documents come from, the tokenizer, and how they are packed and batched."""
  data = ml_collections.ConfigDict()
  data.source = "files"  # "files": local globs below; "hf": a Hugging Face Hub dataset
  data.hf_path = "roneneldan/TinyStories"
  data.hf_name = ""  # the dataset's config name, if it has several
  data.hf_train_split = "train"
  data.hf_eval_split = "validation"
  data.hf_data_files = ""  # data_files for loaders such as hf_path="json" (comma-separated)
  data.hf_streaming = True  # stream records (windowed shuffle); False: download, memory-map
  data.text_key = "text"  # the field (JSONL, Parquet, Hub column) that holds the document
  # One of FORMATS. "text": each record's text_key is a document. "chat": each record's
  # "messages" is a conversation ([{"role", "content"}], roles system/user/assistant, optional
  # "reasoning_content" in assistant turns), trained on what the assistant writes (docs/chat.md).
  data.format = "text"
  # Comma-separated globs of .jsonl/.json (JSON lines), .txt and .parquet files, or of dataset
  # directories written by scripts/prepare_dataset.py (pretokenized shards).
  data.train_files = ""
  data.eval_files = ""  # same; empty with source="files" turns evaluation off
  # For a source without an eval split (FineWeb-Edu has only "train"): this share of its
  # documents, chosen by a hash of each one's content (data/holdout.py), is read by evaluation
  # and skipped by training, on every host and across resumes. It applies where evaluation
  # reads the training source: source="hf" with hf_eval_split == hf_train_split (required
  # then), or source="files" with eval_files empty. 0: off.
  data.holdout_fraction = 0.0
  data.text_separator = ""  # .txt files: "" = one document per line, else the separator
  # A weighted mixture of training sources instead of train_files: "SOURCE=WEIGHT;...", each
  # SOURCE file globs or pretokenized datasets (like train_files) or a Hub dataset streamed as
  # "hf:PATH[:NAME][@SPLIT][#TEXT_KEY]" (split train and data.text_key by default), e.g.
  # "hf:HuggingFaceFW/fineweb-edu:sample-10BT=0.7;code/*.jsonl=0.2;shards/instruct=0.1".
  # Weights are shares of training windows. Evaluation still reads eval_files or the Hub.
  data.mixture = ""
  # The tokenizer (data/tokenizer_source.py): a sentencepiece model file, a Hugging Face
  # tokenizer.json, a directory holding either, or hf:ORG/NAME[@REVISION] from the Hub (e.g.
  # "hf:meta-llama/Llama-3.2-1B"). Empty: that of train.init_from's weights, else the
  # pretokenized data's, else a sentencepiece BPE of model.vocab_size pieces trained on the data.
  data.tokenizer = ""
  data.tokenizer_train_docs = 200_000  # documents read to train that tokenizer
  data.seq_len = 256  # T, tokens per training sequence
  data.batch_size = 32  # B, global batch in sequences (split evenly over processes)
  data.packing = "concat"  # one of PACKINGS: concat-and-split, or first_fit (no splits)
  data.pack_bins = 64  # first_fit: windows filled at once (more: less padding)
  data.num_workers = 0  # grain worker processes per data stream, to tokenise (0: in-process)
  # The data streams that fill each global batch, each its share of the rows (see
  # data/pipeline.py): 0 = as many as the processes that read distinct rows at the run's first
  # start; a resumed run keeps its checkpoint's. The batches do not depend on how many processes
  # read them, so a run resumes on another slice with the same data.
  data.streams = 0
  data.shuffle_seed = 0
  data.shuffle_window = 10_000  # documents shuffled together when streaming from the Hub
  return data


def _optim_defaults() -> ml_collections.ConfigDict:
  """AdamW, its schedule, clipping and gradient accumulation."""
  optim = ml_collections.ConfigDict()
  optim.lr = 3e-4  # peak learning rate, reached at the end of warmup
  optim.min_lr = 3e-5  # the cosine decays to this at the last step
  optim.warmup_steps = 100
  optim.weight_decay = 0.1  # AdamW decay, not applied to norms
  optim.b1 = 0.9
  optim.b2 = 0.95
  optim.eps = 1e-8
  optim.grad_clip = 1.0  # global-norm clipping; 0 turns it off
  optim.grad_accum = 1  # micro-batches per step; batch_size must divide by it
  return optim


def _train_defaults() -> ml_collections.ConfigDict:
  """The run: steps, logging, evaluation, checkpoints, samples."""
  train = ml_collections.ConfigDict()
  train.steps = 1000
  train.seed = 0  # parameter initialisation
  train.log_every = 10
  train.eval_every = 200
  train.eval_steps = 20  # batches per evaluation (fewer if the split is smaller)
  # Checkpoints go to WORKDIR/checkpoints/<step>; rerunning the command on the workdir resumes.
  train.ckpt_every = 500  # steps between saves; 0 saves only at the end (and on SIGTERM)
  train.keep_ckpts = 3  # the newest N are kept; older ones go once a newer save is complete
  train.async_checkpoint = True  # write in the background while training goes on
  train.max_bad_steps = 20  # consecutive non-finite steps (each skipped) before stopping
  # "START:STOP": trace steps START..STOP-1 with jax.profiler into WORKDIR/profile/ (profiling.py)
  train.profile_steps = ""
  # Linux/glibc: malloc keeps freed host memory for reuse (hostmem.py), so XLA:CPU's per-step
  # scratch space is not page-faulted in again every step; on a CPU run, steps ~20% faster.
  train.keep_host_memory = True
  # Parameters to start from (optimizer and step fresh): a workdir, its checkpoints/ folder,
  # one checkpoints/<step> folder, a Hugging Face Llama directory (config.json + safetensors),
  # or hf:ORG/NAME[@REVISION] from the Hub. Published weights also set the model's shape and,
  # with data.tokenizer empty, the tokenizer (init_from.py). Ignored when the workdir has a
  # checkpoint to resume.
  train.init_from = ""
  # Every sample_every steps and at the end, greedy continuations of these prompts ("|"-separated)
  # of sample_tokens tokens go to the log and to TensorBoard's text tab; sample_tokens=0: none.
  train.sample_prompts = "Once upon a time|One day, a little"
  train.sample_tokens = 0
  train.sample_every = 200
  # A Hub model repository ("user/name") that receives the Hugging Face export of the run's
  # checkpoint every push_every steps (a multiple of ckpt_every; 0: every checkpoint) and at the
  # end, uploaded by a background process (nanollama_jax/hub.py) with the token huggingface_hub
  # finds (HF_TOKEN or `hf auth login`); "" uploads nothing.
  train.push_to_hub = ""
  train.push_every = 0
  return train


def _mesh_defaults() -> ml_collections.ConfigDict:
  """The device mesh (see sharding.py): the product of the sizes must be the number of devices;
  one axis may be -1, taking the devices left. The batch is split over data x fsdp."""
  mesh = ml_collections.ConfigDict()
  mesh.data = 1  # replicas
  mesh.fsdp = -1  # parameters and optimizer state sharded (ZeRO-3 style)
  mesh.tensor = 1  # heads, MLP and vocabulary split (tensor parallelism)
  return mesh


def _wandb_defaults() -> ml_collections.ConfigDict:
  """Weights & Biases (tracking.py): every logged row, the samples and the config, beside
  metrics.jsonl and TensorBoard. Needs the wandb extra (pip install -e ".[wandb]")."""
  wandb = ml_collections.ConfigDict()
  wandb.project = ""  # the W&B project; "" turns W&B off
  wandb.entity = ""  # the team or user; "": the API key's default
  wandb.name = ""  # the run's display name; "": the workdir's name
  wandb.group = ""
  wandb.tags = ""  # comma-separated
  wandb.mode = "online"  # one of WANDB_MODES; offline writes WORKDIR/wandb/ for `wandb sync`
  return wandb


def head_dim(model: ml_collections.ConfigDict) -> int:
  """E, the width of one attention head: model.dim // model.n_heads."""
  return model.dim // model.n_heads


def _fail(key: str, value: Any, allowed: str) -> None:
  raise errors.ConfigError(f"{key}={value!r}: {allowed}")


def _is_group(value: Any) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _all_keys(group: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in group.items():
    keys.append(prefix + key)
    if _is_group(value):
      keys += _all_keys(value, f"{prefix}{key}.")
  return keys


def _unknown_key(name: str) -> errors.ConfigError:
  """The error for a key the schema lacks, naming the closest keys at its depth."""
  group, _, last = name.rpartition(".")
  peers = [k for k in _all_keys(get_default_config()) if k.count(".") == name.count(".")]
  close = difflib.get_close_matches(name, peers, n=3, cutoff=0.6)
  if not close:  # a misspelled field: compare its name with the other fields of its group
    close = [k for k in peers if k.startswith(group + ".")
             and difflib.SequenceMatcher(None, k.rpartition(".")[2], last).ratio() >= 0.5][:3]
  hint = f"did you mean {' or '.join(close)}? " if close else ""
  return errors.ConfigError(
    f"unknown config key {name!r}; {hint}every field and its default are in "
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


def _check_ints(values: dict[str, Any], minimum: int) -> None:
  """Each value must be an integer (not a bool) of at least `minimum`."""
  allowed = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
  for key, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      _fail(key, value, allowed)


def _check_positive(values: dict[str, Any]) -> None:
  for key, value in values.items():
    if not value > 0:
      _fail(key, value, "must be > 0")


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    _fail(key, value, f"allowed: {', '.join(allowed)}")


def _check_rope_scaling(scaling: Any) -> None:
  if scaling is None:
    return
  rs = dict(scaling)
  if sorted(rs) != sorted(ROPE_SCALING_KEYS):
    _fail("model.rope_scaling", rs, f"must be None or have exactly the keys {ROPE_SCALING_KEYS}")
  for key in ROPE_SCALING_KEYS:
    if not rs[key] > 0:
      _fail(f"model.rope_scaling.{key}", rs[key], "must be > 0")
  if not rs["high_freq_factor"] > rs["low_freq_factor"]:
    _fail("model.rope_scaling.high_freq_factor", rs["high_freq_factor"],
          f"must be > low_freq_factor={rs['low_freq_factor']}")


def _check_model(model_cfg: ml_collections.ConfigDict) -> None:
  _check_ints({f"model.{k}": model_cfg[k] for k in (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
    "loss_chunk_len")}, 1)
  _check_positive({f"model.{k}": model_cfg[k] for k in ("norm_eps", "rope_theta", "init_std")})
  if model_cfg.dim % model_cfg.n_heads:
    _fail("model.dim", model_cfg.dim, f"must be divisible by model.n_heads={model_cfg.n_heads}")
  if head_dim(model_cfg) % 2:
    _fail("model.dim", model_cfg.dim,
          f"dim / n_heads = {head_dim(model_cfg)} must be even: RoPE rotates pairs of features")
  if model_cfg.n_heads % model_cfg.n_kv_heads:
    _fail("model.n_kv_heads", model_cfg.n_kv_heads,
          f"must divide model.n_heads={model_cfg.n_heads}")
  _check_choice("model.attention", model_cfg.attention, ATTENTION_IMPLS)
  _check_choice("model.remat", model_cfg.remat, REMAT_POLICIES)
  _check_choice("model.chunked_loss", model_cfg.chunked_loss, CHUNKED_LOSS)
  _check_choice("model.dtype", model_cfg.dtype, DTYPES)
  _check_choice("model.param_dtype", model_cfg.param_dtype, DTYPES)
  _check_rope_scaling(model_cfg.rope_scaling)


def _check_data(data_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
                optim_cfg: ml_collections.ConfigDict) -> None:
  _check_ints({f"data.{k}": data_cfg[k] for k in (
    "seq_len", "batch_size", "tokenizer_train_docs", "pack_bins", "shuffle_window")}, 1)
  _check_ints({f"data.{k}": data_cfg[k] for k in ("num_workers", "shuffle_seed", "streams")}, 0)
  if data_cfg.streams and data_cfg.batch_size % data_cfg.streams:
    _fail("data.streams", data_cfg.streams,
          f"must divide data.batch_size={data_cfg.batch_size} (each stream fills as many rows)")
  if data_cfg.seq_len > model_cfg.max_seq_len:
    _fail("data.seq_len", data_cfg.seq_len,
          f"must be <= model.max_seq_len={model_cfg.max_seq_len}")
  _check_choice("data.source", data_cfg.source, DATA_SOURCES)
  _check_choice("data.packing", data_cfg.packing, PACKINGS)
  _check_choice("data.format", data_cfg.format, FORMATS)
  if data_cfg.mixture:
    data_spec.parse_mixture(data_cfg.mixture)
  if data_cfg.source == "hf" and not data_cfg.hf_path:
    _fail("data.hf_path", data_cfg.hf_path, "must name a Hub dataset when data.source='hf'")
  _check_holdout(data_cfg)
  accum = optim_cfg.grad_accum
  if isinstance(accum, int) and accum > 0 and data_cfg.batch_size % accum:
    _fail("data.batch_size", data_cfg.batch_size,
          f"must be divisible by optim.grad_accum={optim_cfg.grad_accum}")


def _check_holdout(data_cfg: ml_collections.ConfigDict) -> None:
  """Evaluation never reads training documents: a split that both read needs a hold-out."""
  f = data_cfg.holdout_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 0.5:
    _fail("data.holdout_fraction", f, "must be a number in [0, 0.5] (0: off)")
  hf = data_cfg.source == "hf"
  key, train_key = ("hf_eval_split", "hf_train_split") if hf else ("eval_files", "train_files")
  if not f and data_cfg[key] and data_cfg[key] == data_cfg[train_key]:
    _fail(f"data.{key}", data_cfg[key], f"is also data.{train_key}, so evaluation would read "
          "training documents: set data.holdout_fraction (e.g. 0.005) to evaluate on a share "
          f"held out of training{'' if hf else ' (and leave eval_files empty)'}")
  if f and (data_cfg[key] != data_cfg[train_key] if hf else data_cfg.eval_files):
    _fail("data.holdout_fraction", f, f"holds evaluation documents out of data.{train_key}, but "
          f"data.{key}={data_cfg[key]!r} is an eval split of its own: set the fraction to 0, or "
          + (f"data.{key} to data.{train_key}" if hf else "leave eval_files empty"))
  if f and not data_cfg[train_key]:
    _fail("data.holdout_fraction", f,
          f"evaluates on documents held out of data.{train_key}, which is empty")


def _check_optim(optim_cfg: ml_collections.ConfigDict, steps: int) -> None:
  _check_ints({"optim.grad_accum": optim_cfg.grad_accum}, 1)
  _check_ints({"optim.warmup_steps": optim_cfg.warmup_steps}, 0)
  _check_positive({"optim.lr": optim_cfg.lr, "optim.eps": optim_cfg.eps})
  if optim_cfg.min_lr < 0 or optim_cfg.min_lr > optim_cfg.lr:
    _fail("optim.min_lr", optim_cfg.min_lr, f"must be between 0 and optim.lr={optim_cfg.lr}")
  if optim_cfg.warmup_steps > steps:
    _fail("optim.warmup_steps", optim_cfg.warmup_steps,
          f"is longer than the run: must be <= train.steps={steps}")
  for key in ("b1", "b2"):
    if not 0 <= optim_cfg[key] < 1:
      _fail(f"optim.{key}", optim_cfg[key], "must be in [0, 1)")
  for key in ("weight_decay", "grad_clip"):
    if optim_cfg[key] < 0:
      _fail(f"optim.{key}", optim_cfg[key], "must be >= 0")


def _check_train(train_cfg: ml_collections.ConfigDict) -> None:
  _check_ints({f"train.{k}": train_cfg[k] for k in (
    "steps", "log_every", "eval_every", "eval_steps", "keep_ckpts", "max_bad_steps",
    "sample_every")}, 1)
  if train_cfg.push_to_hub and len(train_cfg.push_to_hub.split("/")) != 2:
    _fail("train.push_to_hub", train_cfg.push_to_hub, "must be a Hub repository id, user/name")
  _check_ints({f"train.{k}": train_cfg[k] for k in (
    "seed", "ckpt_every", "sample_tokens", "push_every")}, 0)
  every, ckpt_every = train_cfg.push_every, train_cfg.ckpt_every
  if train_cfg.push_to_hub and every and (not ckpt_every or every % ckpt_every):
    multiple = (f"a multiple of train.ckpt_every={ckpt_every}" if ckpt_every else
                "0 when train.ckpt_every=0 (checkpoints at the end only)")
    _fail("train.push_every", every, f"counts steps between pushes, and a push uploads a "
          f"checkpoint: must be {multiple}, or 0 to push every checkpoint")
  profile_steps(train_cfg.profile_steps)


def profile_steps(spec: str) -> tuple[int, int] | None:
  """(start, stop) of train.profile_steps="START:STOP", or None when empty."""
  if not spec:
    return None
  start, sep, stop = str(spec).partition(":")
  try:
    first, end = int(start), int(stop)
  except ValueError:
    first = end = 0
  if not sep or first < 1 or end <= first:
    _fail("train.profile_steps", spec,
          "must be START:STOP, to trace steps START..STOP-1 (1 <= START < STOP, e.g. 10:13), "
          "or empty")
  return first, end


def _check_mesh(mesh_cfg: ml_collections.ConfigDict) -> None:
  for axis in ("data", "fsdp", "tensor"):
    size = mesh_cfg[axis]
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", size, "must be a positive integer or -1 (the devices left)")
  if [mesh_cfg[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    _fail("mesh", mesh_cfg.to_dict(), "at most one axis can be -1")


def _check_files(data_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict) -> None:
  """The files and directories the config names exist."""
  if data_cfg.mixture:
    for source, _ in data_spec.parse_mixture(data_cfg.mixture):
      if not source.startswith(data_spec.HUB_PREFIX):
        data_spec.expand_globs(source, "data.mixture")
  elif data_cfg.source == "files":
    data_spec.expand_globs(data_cfg.train_files, "data.train_files")
    if data_cfg.eval_files:
      data_spec.expand_globs(data_cfg.eval_files, "data.eval_files")
  if data_cfg.tokenizer and hf_files.is_hub_name(data_cfg.tokenizer):
    hf_files.parse(data_cfg.tokenizer, "data.tokenizer")
  elif data_cfg.tokenizer and not paths.exists(data_cfg.tokenizer):
    _fail("data.tokenizer", data_cfg.tokenizer, "no such file or directory (a tokenizer.model, "
          "a tokenizer.json, a directory holding one, or hf:ORG/NAME; empty: train one)")
  if train_cfg.init_from and hf_files.is_hub_name(train_cfg.init_from):
    hf_files.parse(train_cfg.init_from, "train.init_from")
  elif train_cfg.init_from and not paths.isdir(train_cfg.init_from):
    _fail("train.init_from", train_cfg.init_from,
          "no such directory (a workdir, its checkpoints/, a checkpoints/<step> folder, a "
          "Hugging Face Llama directory, or hf:ORG/NAME)")


def is_hf_directory(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory (config.json + safetensors), not a run."""
  return paths.exists(paths.join(path, "config.json")) and any(
    n.endswith((".safetensors", ".safetensors.index.json")) for n in paths.listdir(path))


def _check_installed(cfg: ml_collections.ConfigDict) -> None:
  """The extras the config's features import are installed, so a run does not stop midway."""
  train_cfg = cfg.train
  needs = []  # (config key, its value, the extra it needs, the feature)
  if cfg.wandb.project:
    needs.append(("wandb.project", cfg.wandb.project, "wandb", "logging to Weights & Biases"))
  if train_cfg.push_to_hub:
    needs.append(("train.push_to_hub", train_cfg.push_to_hub, "hf", "pushing to the Hub"))
  if train_cfg.init_from and (hf_files.is_hub_name(train_cfg.init_from)
                              or is_hf_directory(train_cfg.init_from)):
    needs.append(("train.init_from", train_cfg.init_from, "hf", "reading Hugging Face weights"))
  for key, value, extra, feature in needs:
    try:
      errors.require(errors.MODULES[extra], extra, feature)
    except errors.InstallError as e:
      _fail(key, value, str(e))


def validate(cfg: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """Raises errors.ConfigError naming the first key whose value cannot work.

  `check_files`: also that the files the config names exist and the extras it uses are installed
  (off where the config is only compiled, e.g. on another machine).
  """
  _check_known_keys(cfg, get_default_config(), "")
  _check_model(cfg.model)
  _check_train(cfg.train)
  _check_optim(cfg.optim, cfg.train.steps)
  _check_data(cfg.data, cfg.model, cfg.optim)
  _check_mesh(cfg.mesh)
  _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
  if check_files:
    _check_files(cfg.data, cfg.train)
    _check_installed(cfg)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config written by `to_json`, on top of the defaults so new fields get theirs."""
  cfg = get_default_config()
  for group, fields in json.loads(text).items():
    if group not in cfg:
      raise errors.ConfigError(f"unknown config group {group!r} in the saved config")
    for key, value in fields.items():
      if key not in cfg[group]:
        raise errors.ConfigError(f"unknown config key '{group}.{key}' in the saved config")
      cfg[group][key] = value
  return cfg

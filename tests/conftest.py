"""Shared test fixtures: the TinyStories sample the package ships (or $NANOLLAMA_SAMPLE_DATA)."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Sharding tests need several devices; fake them on the CPU before jax is imported anywhere.
# The tests' programs are tiny and compiled once or twice each, so compiling dominates their
# time: LLVM without optimisation passes compiles a train step in half the time (3.4 s against
# 6.8 s for the tests' 2-layer model) and changes no result (no fast-math either way); XLA's
# own HLO optimisations still run. Subprocesses inherit both flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests train the same small models, in this process and in subprocesses: a compilation
# cache shared by the session compiles each program once. It starts empty every session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="nanollama-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionstart(session):
  """Stops the session at once, not after minutes of errors, when the sample is missing."""
  del session
  from nanollama_jax.data import sample_dir  # pylint: disable=g-import-not-at-top
  try:
    sample_dir()
  except FileNotFoundError as e:
    pytest.exit(f"the TinyStories sample is missing: {e}", returncode=4)


@pytest.fixture(scope="session")
def sample_dir() -> pathlib.Path:
  """The directory holding train.jsonl and validation.jsonl of the TinyStories sample."""
  from nanollama_jax import data  # pylint: disable=g-import-not-at-top
  return data.sample_dir()


@pytest.fixture(scope="session")
def tokenizer_path(sample_dir, tmp_path_factory) -> pathlib.Path:
  """A 512-piece tokenizer trained once on the sample's train.jsonl."""
  from nanollama_jax.data import records, spm_tokenizer  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("tokenizer") / "tok512.model"
  docs = list(records.read_files([str(sample_dir / "train.jsonl")], "text"))
  spm_tokenizer.train_tokenizer(docs, 512, str(path))
  return path


@pytest.fixture(scope="session")
def trained_run(sample_dir, tokenizer_path, tmp_path_factory) -> pathlib.Path:
  """A workdir with a tiny model (dim 64, 2 layers, vocab 512, context 128) trained for 40 steps
  on the sample, checkpoints at steps 20 and 40. Tests read it and must not change it."""
  from nanollama_jax import config, train  # pylint: disable=g-import-not-at-top
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                        max_seq_len=128))
  cfg.data.update(dict(source="files", train_files=str(sample_dir / "train.jsonl"),
                       eval_files=str(sample_dir / "validation.jsonl"),
                       tokenizer=str(tokenizer_path), seq_len=64, batch_size=16))
  cfg.optim.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=5))
  cfg.train.update(dict(steps=40, log_every=20, eval_every=40, eval_steps=4, ckpt_every=20))
  workdir = tmp_path_factory.mktemp("run")
  train.train(cfg, str(workdir))
  return workdir


def _mistral_model(name: str) -> pathlib.Path:
  """A sentencepiece model that ships in the mistral-common wheel (the test extra installs it)."""
  import mistral_common  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(mistral_common.__file__).resolve().parent / "data" / name
  assert path.is_file(), f"{path} is missing: the test extra's mistral-common ships it"
  return path


@pytest.fixture(scope="session")
def mistral_v1() -> pathlib.Path:
  """Mistral's first tokenizer (32,000 pieces, LLaMA's options: BPE, byte fallback, dummy prefix)."""
  return _mistral_model("tokenizer.model.v1")


@pytest.fixture(scope="session")
def mistral_v3() -> pathlib.Path:
  """Mistral's v3 tokenizer (32,768 pieces: control tokens [INST], [/INST] ..., user-defined ones)."""
  return _mistral_model("mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="session")
def llama3_style(sample_dir, tmp_path_factory) -> pathlib.Path:
  """A directory with a Llama-3-style tokenizer.json (byte-level BPE with Llama 3's
  pre-tokenizer, 1,024 ids, its special tokens) and a tokenizer_config.json with its BOS, EOS and
  chat template, trained in a second on the sample."""
  from helpers import LLAMA3_SPECIALS, LLAMA3_TEMPLATE  # pylint: disable=g-import-not-at-top
  from nanollama_jax.data import hf_tokenizer, records  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("llama3_style")
  docs = list(records.read_files([str(sample_dir / "train.jsonl")], "text"))
  hf_tokenizer.train_byte_level_bpe(docs, 1024, str(out), LLAMA3_SPECIALS,
                                    chat_template=LLAMA3_TEMPLATE)
  return out

"""Shared test fixtures: the TinyStories sample, found through NANOLLAMA_SAMPLE_DATA."""

import os
import pathlib

import pytest

# Sharding tests need several devices; fake them on the CPU before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def sample_dir() -> pathlib.Path:
  """The directory holding train.jsonl and validation.jsonl of the TinyStories sample."""
  env = os.environ.get("NANOLLAMA_SAMPLE_DATA")
  if not env:
    pytest.fail(
      "NANOLLAMA_SAMPLE_DATA is not set: point it at the TinyStories sample directory "
      "(train.jsonl, validation.jsonl), e.g. export NANOLLAMA_SAMPLE_DATA=../shared/data/tinystories-sample"
    )
  path = pathlib.Path(env).resolve()
  missing = [n for n in ("train.jsonl", "validation.jsonl") if not (path / n).is_file()]
  if missing:
    pytest.fail(f"NANOLLAMA_SAMPLE_DATA={env}: missing {', '.join(missing)}")
  return path


@pytest.fixture(scope="session")
def tokenizer_path(sample_dir, tmp_path_factory) -> pathlib.Path:
  """A 512-piece tokenizer trained once on the sample's train.jsonl."""
  from nanollama_jax.data import sources, tokenizer  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("tokenizer") / "tok512.model"
  docs = list(sources.read_files([str(sample_dir / "train.jsonl")], "text"))
  tokenizer.train_tokenizer(docs, 512, str(path))
  return path

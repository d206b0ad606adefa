"""Data: the tokenizer, document sources, pretokenized shards and the grain pipeline.

The package ships a small TinyStories sample (`tinystories_sample/`, about 1 MB) for the tests
and the offline examples; `sample_dir()` finds it. `chat_sample/` (CHAT_SAMPLE) holds chat
conversations made from it (scripts/make_chat_sample.py) for the chat format.
"""

from __future__ import annotations

import os
import pathlib

from nanollama_jax import errors

SAMPLE_ENV = "NANOLLAMA_SAMPLE_DATA"  # overrides the shipped sample's directory
SAMPLE_FILES = ("train.jsonl", "validation.jsonl")
SHIPPED_SAMPLE = pathlib.Path(__file__).resolve().parent / "tinystories_sample"
CHAT_SAMPLE = pathlib.Path(__file__).resolve().parent / "chat_sample"


def sample_dir() -> pathlib.Path:
  """The TinyStories sample's directory: $NANOLLAMA_SAMPLE_DATA if set, else the shipped one.

  Raises FileNotFoundError naming the directory and the missing files.
  """
  env = os.environ.get(SAMPLE_ENV)
  path = pathlib.Path(env).expanduser().resolve() if env else SHIPPED_SAMPLE
  missing = [name for name in SAMPLE_FILES if not (path / name).is_file()]
  if missing:
    where = f"{SAMPLE_ENV}={env}" if env else "the shipped sample"
    raise errors.DataError(f"{where}: {path} lacks {', '.join(missing)}")
  return path


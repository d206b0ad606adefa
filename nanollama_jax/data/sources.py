"""Document sources: the texts of a split, from local files or a Hugging Face dataset."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence

import ml_collections

from nanollama_jax import config

SPLITS = ("train", "eval")
JSON_EXTENSIONS = (".jsonl", ".json")
TEXT_EXTENSIONS = (".txt",)


def _json_lines(path: str, text_key: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
          f"{path}, line {number}: no field {text_key!r} (data.text_key); the record has {keys}"
        )
      text = record[text_key]
      if not isinstance(text, str):
        raise ValueError(
          f"{path}, line {number}: field {text_key!r} is a {type(text).__name__}, not a string"
        )
      yield text


def _text_lines(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line:
        yield line


def read_files(paths: Sequence[str], text_key: str) -> Iterator[str]:
  """Yields the documents of files in order: a JSON line's `text_key`, or a non-empty .txt line."""
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
      yield from _json_lines(path, text_key)
    elif ext in TEXT_EXTENSIONS:
      yield from _text_lines(path)
    else:
      allowed = ", ".join(JSON_EXTENSIONS + TEXT_EXTENSIONS)
      raise ValueError(f"{path}: unsupported file type {ext!r}; allowed: {allowed}")


class _Column(Sequence[str]):
  """A random-access view of one text column of a `datasets.Dataset`."""

  def __init__(self, dataset, text_key: str):
    self._dataset = dataset
    self._key = text_key

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> str:
    return self._dataset[index][self._key]


def hf_documents(
  path: str, name: str | None, split: str, text_key: str,
  data_files: str | Sequence[str] | None = None,
) -> Sequence[str]:
  """Returns the texts of a (downloaded, memory-mapped) Hugging Face dataset split."""
  import datasets  # pylint: disable=g-import-not-at-top  # slow to import, only needed here

  try:
    dataset = datasets.load_dataset(path, name, split=split, data_files=data_files)
  except (ConnectionError, FileNotFoundError) as e:
    raise config.ConfigError(
      f"data.hf_path={path!r}: cannot load split {split!r} ({e}). Check the name and the "
      "network, or train on local files with --config.data.source=files "
      "--config.data.train_files=GLOB --config.data.eval_files=GLOB"
    ) from None
  if text_key not in dataset.column_names:
    raise ValueError(
      f"data.text_key={text_key!r} is not a column of {path} ({split}); "
      f"columns: {', '.join(dataset.column_names)}"
    )
  return _Column(dataset.select_columns([text_key]), text_key)


def _files(data_cfg: ml_collections.ConfigDict, split: str) -> list[str]:
  key = "train_files" if split == "train" else "eval_files"
  return config.expand_globs(data_cfg[key], f"data.{key}")


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """Returns the documents of `split` ('train' or 'eval') as a random-access sequence of texts."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
  if data_cfg.source == "files":
    return list(read_files(_files(data_cfg, split), data_cfg.text_key))
  if data_cfg.source == "hf":
    hf_split = data_cfg.hf_train_split if split == "train" else data_cfg.hf_eval_split
    return hf_documents(data_cfg.hf_path, data_cfg.hf_name or None, hf_split, data_cfg.text_key)
  raise config.ConfigError(
    f"data.source={data_cfg.source!r}: allowed: {', '.join(config.DATA_SOURCES)}"
  )


def first_documents(data_cfg: ml_collections.ConfigDict, n: int) -> list[str]:
  """Returns the first `n` training documents (fewer if the split is smaller), in file order."""
  if data_cfg.source == "files":
    return list(itertools.islice(read_files(_files(data_cfg, "train"), data_cfg.text_key), n))
  docs = documents(data_cfg, "train")
  return [docs[i] for i in range(min(n, len(docs)))]

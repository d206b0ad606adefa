"""Document sources: what a split reads, from local files, pretokenized shards or the Hub.

A split opens as a `Documents`: either a random-access sequence (texts read from local files or
a downloaded Hub dataset, or token arrays of a pretokenized dataset), which the pipeline shuffles
globally and splits between hosts by index, or a `HubStream` of records streamed from the Hub,
which it shuffles in windows and which splits itself between hosts.

Bad records never reach a worker: empty documents and lines that are not valid UTF-8 are skipped
and counted (`Documents.skipped`, logged); a record without the text field, a line that is not
JSON, a glob that matches nothing or a split without documents is an error that names the file,
the line and the key.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
from absl import logging

from nanollama_jax import config
from nanollama_jax.data import DataError, HubUnreachable, shards

SPLITS = ("train", "eval")
JSON_EXTENSIONS = (".jsonl", ".json")
TEXT_EXTENSIONS = (".txt",)
PARQUET_EXTENSIONS = (".parquet",)
EXTENSIONS = JSON_EXTENSIONS + TEXT_EXTENSIONS + PARQUET_EXTENSIONS
EMPTY, BAD_UTF8 = "empty documents", "lines that are not UTF-8"


def _text_or_skip(text: Any, where: str, text_key: str, skipped: collections.Counter) -> str | None:
  if text is None or (isinstance(text, str) and not text.strip()):
    skipped[EMPTY] += 1
    return None
  if not isinstance(text, str):
    raise DataError(f"{where}: field {text_key!r} is a {type(text).__name__}, not a string")
  return text


def _decode(raw: bytes, skipped: collections.Counter) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    skipped[BAD_UTF8] += 1
    return None


def _json_lines(path: str, text_key: str, skipped: collections.Counter) -> Iterator[str]:
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      line = _decode(raw, skipped)
      if line is None or not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
          f"{path}, line {number}: no field {text_key!r} (data.text_key); the record has {keys}"
        )
      text = _text_or_skip(record[text_key], f"{path}, line {number}", text_key, skipped)
      if text is not None:
        yield text


def _text_lines(path: str, separator: str, skipped: collections.Counter) -> Iterator[str]:
  if not separator:  # one document per line; blank lines only separate
    with open(path, "rb") as f:
      for raw in f:
        line = _decode(raw.rstrip(b"\r\n"), skipped)
        if line and line.strip():
          yield line
    return
  with open(path, "rb") as f:
    pieces = f.read().split(separator.encode("utf-8"))
  for i, raw in enumerate(pieces):
    text = _decode(raw.strip(), skipped)
    if text:
      yield text
    elif text is not None and 0 < i < len(pieces) - 1:  # not before the first or after the last
      skipped[EMPTY] += 1


def _parquet(path: str, text_key: str, skipped: collections.Counter) -> Iterator[str]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file that is not Parquet
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  columns = table.schema_arrow.names
  if text_key not in columns:
    raise DataError(f"{path}: no column {text_key!r} (data.text_key); columns: "
                     f"{', '.join(columns)}")
  for batch in table.iter_batches(columns=[text_key], batch_size=4096):
    for text in batch.column(0).to_pylist():
      text = _text_or_skip(text, path, text_key, skipped)
      if text is not None:
        yield text


def read_files(paths: Sequence[str], text_key: str, separator: str = "",
               skipped: collections.Counter | None = None) -> Iterator[str]:
  """Yields the documents of text files in order; skipped records are counted in `skipped`."""
  skipped = collections.Counter() if skipped is None else skipped
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
      yield from _json_lines(path, text_key, skipped)
    elif ext in TEXT_EXTENSIONS:
      yield from _text_lines(path, separator, skipped)
    elif ext in PARQUET_EXTENSIONS:
      yield from _parquet(path, text_key, skipped)
    else:
      raise DataError(f"{path}: unsupported file type {ext!r}; allowed: {', '.join(EXTENSIONS)}"
                       " or a directory written by scripts/prepare_dataset.py")


class _Column(Sequence[str]):
  """A random-access view of one text column of a `datasets.Dataset`; empty texts read as ''."""

  def __init__(self, dataset, text_key: str):
    self._dataset = dataset
    self._key = text_key

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> str:
    return self._dataset[index][self._key] or ""


HUB_PROBE_TIMEOUT_S = 5.0


def _is_hub_dataset(path: str) -> bool:
  """Whether `path` names a Hub dataset, not a local folder or a packaged loader ("json")."""
  from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES  # pylint: disable=import-outside-toplevel
  return not os.path.exists(path) and path not in _PACKAGED_DATASETS_MODULES


def check_hub_reachable(path: str) -> None:
  """Raises HubUnreachable within seconds when the Hub that serves `path` cannot be reached.

  `datasets` would retry for about 30 s and then report a missing dataset; one HTTP request to
  the endpoint (proxies honoured) tells the network apart from a wrong name first. Local folders,
  packaged loaders and HF_HUB_OFFLINE=1 (the local cache) need no network and are not probed.
  """
  import urllib.error  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  if constants.HF_HUB_OFFLINE or not _is_hub_dataset(path):
    return
  try:
    urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                           timeout=HUB_PROBE_TIMEOUT_S).close()
  except urllib.error.HTTPError:
    return  # the server answered: the network is fine
  except (OSError, ValueError) as e:
    reason = getattr(e, "reason", e)
    raise HubUnreachable(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to read "
                         f"{path!r} ({reason}): the network is down or blocked") from None


def load_hub_dataset(path: str, name: str | None, split: str,
                     data_files: Sequence[str] | None, streaming: bool):
  """`datasets.load_dataset`, with a probe of the network first and one clear error after."""
  import datasets  # pylint: disable=import-outside-toplevel  # slow to import, only needed here

  check_hub_reachable(path)
  try:
    return datasets.load_dataset(path, name, split=split, data_files=data_files,
                                 streaming=streaming)
  except (ConnectionError, FileNotFoundError, ValueError) as e:
    raise config.ConfigError(
      f"data.hf_path={path!r}: cannot load split {split!r} ({e}). Check the dataset's name, "
      "config (data.hf_name) and split, or train on local files with --config.data.source=files "
      "--config.data.train_files=GLOB --config.data.eval_files=GLOB (JSONL, text or Parquet; "
      "scripts/prepare_dataset.py can write Hub data to a local pretokenized dataset once)"
    ) from None


def _data_files(spec: str | Sequence[str] | None):
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  return list(spec) or None if spec is not None else None


def hf_documents(
  path: str, name: str | None, split: str, text_key: str,
  data_files: str | Sequence[str] | None = None,
) -> Sequence[str]:
  """Returns the texts of a (downloaded, memory-mapped) Hugging Face dataset split."""
  dataset = load_hub_dataset(path, name, split, _data_files(data_files), streaming=False)
  if text_key not in dataset.column_names:
    raise DataError(
      f"data.text_key={text_key!r} is not a column of {path} ({split}); "
      f"columns: {', '.join(dataset.column_names)}"
    )
  return _Column(dataset.select_columns([text_key]), text_key)


class HubStream(grain.IterDataset):
  """The records of a Hub split streamed in order, as (text, epoch) pairs.

  With `repeat`, the stream starts over at its end and the epoch counts up. With
  `process_count` > 1 each process reads a disjoint share (whole files where the split has
  enough of them, else every n-th record). The iterator's state is the `datasets` stream's own
  position, so a restore continues without reading the stream again from its start.
  """

  def __init__(self, path: str, name: str | None, split: str, text_key: str,
               data_files: str | Sequence[str] | None = None, repeat: bool = False,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    self.path, self.name, self.split, self.text_key = path, name, split, text_key
    self.data_files = _data_files(data_files)
    self.repeat = repeat
    self.process_index, self.process_count = process_index, process_count
    self.skipped: collections.Counter = collections.Counter()
    # Resolved once, here, so that an unreachable dataset fails with a clear message before the
    # first batch; every iterator streams from a fresh copy (restores move a copy's position).
    from datasets import distributed  # pylint: disable=import-outside-toplevel

    ds = load_hub_dataset(path, name, split, self.data_files, streaming=True)
    if process_count > 1:
      ds = distributed.split_dataset_by_node(ds, process_index, process_count)
    self._resolved = ds

  def open(self):
    """A fresh `datasets` stream of the split, at its start."""
    # An in-memory copy through pickle, the way `datasets` hands streams to worker processes.
    # copy.deepcopy breaks here: it re-creates the cached fsspec filesystems the stream refers to
    # while it copies their cache, and fails once that cache holds two (two endpoints or tokens).
    return pickle.loads(pickle.dumps(self._resolved))

  def __iter__(self) -> "_HubStreamIterator":
    return _HubStreamIterator(self)

  def __str__(self) -> str:
    return f"HubStream({self.path}, {self.split})"


class _HubStreamIterator(grain.DatasetIterator):

  def __init__(self, stream: HubStream):
    super().__init__()
    self._stream = stream
    self._epoch = 0
    self._records_this_epoch = 0
    self._start(None)

  def _start(self, hf_state: dict[str, Any] | None) -> None:
    self._ds = self._stream.open()
    if hf_state is not None:
      self._ds.load_state_dict(hf_state)
    self._it = iter(self._ds)

  def __next__(self) -> tuple[str, int]:
    s = self._stream
    while True:
      try:
        record = next(self._it)
      except StopIteration:
        if not s.repeat or not self._records_this_epoch:
          if not self._records_this_epoch and self._epoch == 0:
            raise DataError(f"{s.path} ({s.split}): the stream has no documents") from None
          raise
        self._epoch += 1
        self._records_this_epoch = 0
        self._ds.set_epoch(self._epoch)
        self._it = iter(self._ds)
        continue
      if s.text_key not in record:
        raise DataError(f"data.text_key={s.text_key!r} is not a field of {s.path} "
                         f"({s.split}); fields: {', '.join(sorted(record))}")
      text = _text_or_skip(record[s.text_key], f"{s.path} ({s.split})", s.text_key, s.skipped)
      if text is not None:
        self._records_this_epoch += 1
        return text, self._epoch

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "records": self._records_this_epoch,
            "hf": self._ds.state_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._records_this_epoch = state["epoch"], state["records"]
    self._start(state["hf"])
    self._ds.set_epoch(self._epoch)


@dataclasses.dataclass
class Documents:
  """A split's documents: `docs` (random access: texts or token arrays) or `stream`."""
  name: str
  docs: Sequence[str] | shards.TokenDocuments | None = None
  stream: HubStream | None = None
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def pretokenized(self) -> bool:
    return isinstance(self.docs, shards.TokenDocuments)


def _open_globs(globs: str, key: str, text_key: str, separator: str) -> Documents:
  paths = config.expand_globs(globs, key)
  datasets_ = [p for p in paths if os.path.isdir(p)]
  if datasets_:
    not_prepared = [p for p in datasets_ if not shards.is_dataset(p)]
    if not_prepared:
      raise config.ConfigError(f"{key}={globs!r}: {not_prepared[0]} is a directory without "
                               f"{shards.INDEX}; write it with scripts/prepare_dataset.py")
    if len(datasets_) != len(paths):
      raise config.ConfigError(f"{key}={globs!r}: matches both pretokenized datasets and text "
                               "files; use one kind per split (or a data.mixture)")
    docs = shards.TokenDocuments(datasets_)
    return Documents(globs, docs=docs)
  skipped: collections.Counter = collections.Counter()
  texts = list(read_files(paths, text_key, separator, skipped))
  return Documents(globs, docs=texts, skipped=skipped)


def open_split(data_cfg: ml_collections.ConfigDict, split: str, *, process_index: int = 0,
               process_count: int = 1, globs: str | None = None) -> Documents:
  """Opens the documents of `split` ('train' or 'eval'), or of a mixture's source `globs` (file
  globs or a Hub dataset "hf:...").

  Only a Hub stream uses the process index and count (it splits itself); the pipeline splits
  random-access documents.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
  if globs is not None and globs.startswith(config.HUB_PREFIX):
    hub = config.parse_hub_source(globs)
    found = Documents(globs, stream=HubStream(
      hub.path, hub.name, hub.split, hub.text_key or data_cfg.text_key, repeat=split == "train",
      process_index=process_index, process_count=process_count))
  elif globs is not None:
    found = _open_globs(globs, "data.mixture", data_cfg.text_key, data_cfg.text_separator)
  elif data_cfg.source == "files":
    key = "train_files" if split == "train" else "eval_files"
    found = _open_globs(data_cfg[key], f"data.{key}", data_cfg.text_key,
                        data_cfg.text_separator)
  elif data_cfg.source == "hf":
    hf_split = data_cfg.hf_train_split if split == "train" else data_cfg.hf_eval_split
    name = f"{data_cfg.hf_path} ({hf_split})"
    if data_cfg.hf_streaming:
      found = Documents(name, stream=HubStream(
        data_cfg.hf_path, data_cfg.hf_name or None, hf_split, data_cfg.text_key,
        data_cfg.hf_data_files, repeat=split == "train", process_index=process_index,
        process_count=process_count))
    else:
      found = Documents(name, docs=hf_documents(data_cfg.hf_path, data_cfg.hf_name or None,
                                                hf_split, data_cfg.text_key,
                                                data_cfg.hf_data_files))
  else:
    raise config.ConfigError(
      f"data.source={data_cfg.source!r}: allowed: {', '.join(config.DATA_SOURCES)}")
  if found.docs is not None and not len(found.docs):
    raise DataError(f"the {split} split ({found.name}) has no documents")
  if found.skipped:
    logging.warning("%s: skipped %s", found.name,
                    ", ".join(f"{n} {what}" for what, n in sorted(found.skipped.items())))
  return found


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """Returns the texts of `split` from local text files or a downloaded Hub dataset."""
  found = open_split(data_cfg, split)
  if found.docs is None or found.pretokenized:
    raise ValueError(f"the {split} split ({found.name}) is not random-access text")
  return found.docs


def _local_train_paths(data_cfg: ml_collections.ConfigDict) -> list[str] | None:
  """The paths of the (first) local training source; None for a Hub dataset."""
  if data_cfg.mixture:
    first = config.parse_mixture(data_cfg.mixture)[0][0]
    return None if first.startswith(config.HUB_PREFIX) else config.expand_globs(
      first, "data.mixture")
  if data_cfg.source == "files":
    return config.expand_globs(data_cfg.train_files, "data.train_files")
  return None


def pretokenized_tokenizer(data_cfg: ml_collections.ConfigDict) -> str | None:
  """The tokenizer.model of the (first) pretokenized training dataset, if the data is one."""
  paths = _local_train_paths(data_cfg)
  if paths and shards.is_dataset(paths[0]):
    return os.path.join(paths[0], shards.TOKENIZER)
  return None


def first_documents(data_cfg: ml_collections.ConfigDict, n: int) -> list[str]:
  """Returns the first `n` training texts (fewer if the split is smaller), in order."""
  paths = _local_train_paths(data_cfg)
  if paths is None:  # the Hub: data.source, or the mixture's first source
    first = config.parse_mixture(data_cfg.mixture)[0][0] if data_cfg.mixture else None
    found = open_split(data_cfg, "train", globs=first)
    if found.stream is not None:
      it = iter(found.stream)
      return [text for text, _ in itertools.islice(it, n)]
    return [found.docs[i] for i in range(min(n, len(found.docs)))]
  if any(os.path.isdir(p) for p in paths):
    raise DataError("the training data is pretokenized: set data.tokenizer to the model it was "
                     "prepared with (its tokenizer.model)")
  skipped: collections.Counter = collections.Counter()
  texts = list(itertools.islice(
    read_files(paths, data_cfg.text_key, data_cfg.text_separator, skipped), n))
  if not texts:
    counts = ", ".join(f"{count} {what}" for what, count in sorted(skipped.items()))
    raise DataError(f"{', '.join(paths)}: no training document to read"
                    f"{f' (skipped {counts})' if counts else ''}")
  return texts

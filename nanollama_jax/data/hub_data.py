"""Hugging Face datasets as document sources: a split downloaded once and memory-mapped, or
streamed (`HubStream`), after a quick probe that tells a network that is down from a wrong name.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Sequence
from typing import Any

import grain

from nanollama_jax import errors, hf_files
from nanollama_jax.errors import DataError, HubUnreachable
from nanollama_jax.data.holdout import Holdout, kept
from nanollama_jax.data.records import (Document, conversation_or_skip, document_or_skip,
                                        field_named, record_field)


class _Column(Sequence[str]):
  """A random-access view of one text column of a `datasets.Dataset`; empty texts read as ''."""

  def __init__(self, dataset, text_key: str):
    self._dataset = dataset
    self._key = text_key

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> str:
    return self._dataset[index][self._key] or ""


def _is_hub_dataset(path: str) -> bool:
  """Whether `path` names a Hub dataset, not a local folder or a packaged loader ("json")."""
  from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES  # pylint: disable=import-outside-toplevel
  return not os.path.exists(path) and path not in _PACKAGED_DATASETS_MODULES


def check_hub_reachable(path: str) -> None:
  """Raises HubUnreachable within seconds when the Hub that serves `path` cannot be reached.

  `datasets` would retry for about 30 s and then report a missing dataset; the probe
  (hf_files.probe) tells the network apart from a wrong name first. Local folders, packaged
  loaders and HF_HUB_OFFLINE=1 (the local cache) need no network and are not probed.
  """
  if not _is_hub_dataset(path):
    return
  try:
    hf_files.probe(repr(path))
  except errors.NetworkError as e:
    raise HubUnreachable(str(e)) from None


def load_hub_dataset(path: str, name: str | None, split: str,
                     data_files: Sequence[str] | None, streaming: bool):
  """`datasets.load_dataset`, with a probe of the network first and one clear error after."""
  import datasets  # pylint: disable=import-outside-toplevel  # slow to import, only needed here

  check_hub_reachable(path)
  try:
    return datasets.load_dataset(path, name, split=split, data_files=data_files,
                                 streaming=streaming)
  except (ConnectionError, FileNotFoundError, ValueError) as e:
    raise errors.ConfigError(
      f"data.hf_path={path!r}: cannot load split {split!r} ({e}). Check the dataset's name, "
      "config (data.hf_name) and split, or train on local files with --config.data.source=files "
      "--config.data.train_files=GLOB --config.data.eval_files=GLOB (JSONL, text or Parquet; "
      "scripts/prepare_dataset.py can write Hub data to a local pretokenized dataset once)"
    ) from None


def _data_files(spec: str | Sequence[str] | None):
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  return list(spec) or None if spec is not None else None


def _kept_texts(batch: dict[str, list], field: str, holdout: Holdout) -> list[bool]:
  """`datasets` filter: which texts of a batch the hold-out keeps (an empty one reads as '')."""
  return [holdout.keeps(text or "") for text in batch[field]]


def hf_documents(
  path: str, name: str | None, split: str, text_key: str,
  data_files: str | Sequence[str] | None = None, doc_format: str = "text",
  skipped: collections.Counter | None = None, holdout: Holdout | None = None,
) -> Sequence[Document]:
  """Returns the documents of a (downloaded) Hugging Face dataset split: its texts, memory-mapped,
  or its conversations, read and checked at once (skipped ones counted in `skipped`); with a
  `holdout`, only those it keeps."""
  dataset = load_hub_dataset(path, name, split, _data_files(data_files), streaming=False)
  field, _ = record_field(text_key, doc_format)
  if field not in dataset.column_names:
    raise DataError(f"{field_named(text_key, doc_format)} is not a column of {path} ({split}); "
                    f"columns: {', '.join(dataset.column_names)}")
  if doc_format == "text":
    dataset = dataset.select_columns([field])
    if holdout is not None:  # hashed once; `datasets` caches the kept rows by the call's inputs
      dataset = dataset.filter(_kept_texts, batched=True, batch_size=10_000,
                               fn_kwargs={"field": field, "holdout": holdout})
    return _Column(dataset, field)
  skipped = collections.Counter() if skipped is None else skipped
  docs = (conversation_or_skip(value, f"{path} ({split}), row {row}", skipped)
          for row, value in enumerate(dataset[field], 1))
  return list(kept((doc for doc in docs if doc is not None), holdout))


class HubStream(grain.IterDataset):
  """The records of a Hub split streamed in order, as (document, epoch) pairs.

  With `repeat`, the stream starts over at its end and the epoch counts up. With
  `streams` > 1 each data stream reads a disjoint share (whole files where the split has
  enough of them, else every n-th record). With a `holdout`, only the documents it keeps. The
  iterator's state is the `datasets` stream's own position, so a restore continues without
  reading the stream again from its start.
  """

  def __init__(self, path: str, name: str | None, split: str, text_key: str,
               data_files: str | Sequence[str] | None = None, repeat: bool = False,
               stream: int = 0, streams: int = 1, doc_format: str = "text",
               holdout: Holdout | None = None):
    super().__init__()
    self.path, self.name, self.split, self.text_key = path, name, split, text_key
    self.doc_format = doc_format
    self.holdout = holdout
    self.data_files = _data_files(data_files)
    self.repeat = repeat
    self.stream, self.streams = stream, streams
    self.skipped: collections.Counter = collections.Counter()
    # Resolved once, here, so that an unreachable dataset fails with a clear message before the
    # first batch; every iterator streams from a fresh copy (restores move a copy's position).
    from datasets import distributed  # pylint: disable=import-outside-toplevel

    ds = load_hub_dataset(path, name, split, self.data_files, streaming=True)
    if streams > 1:
      ds = distributed.split_dataset_by_node(ds, stream, streams)
    self._resolved = ds

  def open(self):
    """A fresh `datasets` stream of the split, at its start."""
    # An in-memory copy through pickle, the way `datasets` hands streams to worker processes.
    # copy.deepcopy breaks here: it re-creates the cached fsspec filesystems the stream refers to
    # while it copies their cache, and fails once that cache holds two (two endpoints or tokens).
    return pickle.loads(pickle.dumps(self._resolved))

  def __iter__(self) -> _HubStreamIterator:
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

  def __next__(self) -> tuple[Document, int]:
    s = self._stream
    field, _ = record_field(s.text_key, s.doc_format)
    while True:
      try:
        record = next(self._it)
      except StopIteration:
        if not s.repeat or not self._records_this_epoch:
          if not self._records_this_epoch and self._epoch == 0:
            among = f" among {s.holdout}" if s.holdout else ""
            raise DataError(f"{s.path} ({s.split}): the stream has no documents{among}") from None
          raise
        self._epoch += 1
        self._records_this_epoch = 0
        self._ds.set_epoch(self._epoch)
        self._it = iter(self._ds)
        continue
      if field not in record:
        raise DataError(f"{field_named(s.text_key, s.doc_format)} is not a field of {s.path} "
                        f"({s.split}); fields: {', '.join(sorted(record))}")
      doc = document_or_skip(record[field], f"{s.path} ({s.split})", field, s.doc_format,
                              s.skipped)
      if doc is not None and (s.holdout is None or s.holdout.keeps(doc)):
        self._records_this_epoch += 1
        return doc, self._epoch

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "records": self._records_this_epoch,
            "hf": self._ds.state_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._records_this_epoch = state["epoch"], state["records"]
    self._start(state["hf"])
    self._ds.set_epoch(self._epoch)

"""What a split reads, from local files, pretokenized shards or the Hub, opened as `Documents`.

A split opens as a `Documents`: either a random-access sequence (texts read from local files or
a downloaded Hub dataset, or token arrays of a pretokenized dataset), which the pipeline shuffles
globally and splits between hosts by index, or a `HubStream` of records streamed from the Hub
(data/hub_data.py), which it shuffles in windows and which splits itself between hosts. What a
document is and how records are checked is in data/records.py; the records a split skipped are
counted in `Documents.skipped` and logged. A glob that matches nothing or a split without
documents is an error that names the key.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Sequence

import ml_collections
from absl import logging

from nanollama_jax import config, data_spec, errors
from nanollama_jax.errors import DataError
from nanollama_jax.data import shards
from nanollama_jax.data.holdout import Holdout, for_split, kept
from nanollama_jax.data.hub_data import HubStream, hf_documents
from nanollama_jax.data.records import Document, read_files

SPLITS = ("train", "eval")


@dataclasses.dataclass
class Documents:
  """A split's documents: `docs` (random access: texts, conversations or token arrays) or
  `stream`."""
  name: str
  docs: Sequence[Document] | shards.TokenDocuments | None = None
  stream: HubStream | None = None
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def pretokenized(self) -> bool:
    return isinstance(self.docs, shards.TokenDocuments)


def _open_globs(globs: str, key: str, text_key: str, separator: str, doc_format: str,
                holdout: Holdout | None) -> Documents:
  paths = data_spec.expand_globs(globs, key)
  datasets_ = [p for p in paths if os.path.isdir(p)]
  if datasets_ and doc_format == "chat":
    raise errors.ConfigError(f"{key}={globs!r}: {datasets_[0]} is a pretokenized dataset, which "
                             "holds no turns: data.format='chat' reads JSON lines or Parquet")
  if datasets_:
    not_prepared = [p for p in datasets_ if not shards.is_dataset(p)]
    if not_prepared:
      raise errors.ConfigError(f"{key}={globs!r}: {not_prepared[0]} is a directory without "
                               f"{shards.INDEX}; write it with scripts/prepare_dataset.py")
    if len(datasets_) != len(paths):
      raise errors.ConfigError(f"{key}={globs!r}: matches both pretokenized datasets and text "
                               "files; use one kind per split (or a data.mixture)")
    docs = shards.TokenDocuments(datasets_)
    return Documents(globs, docs=docs if holdout is None else docs.select(holdout.keeps))
  skipped: collections.Counter = collections.Counter()
  docs = list(kept(read_files(paths, text_key, separator, skipped, doc_format), holdout))
  return Documents(globs, docs=docs, skipped=skipped)


def open_split(data_cfg: ml_collections.ConfigDict, split: str, *, stream: int = 0,
               streams: int = 1, globs: str | None = None) -> Documents:
  """Opens the documents of `split` ('train' or 'eval'), or of a mixture's source `globs` (file
  globs or a Hub dataset "hf:...").

  Only a Hub stream uses the data stream's index and count (it splits itself); the pipeline
  splits random-access documents. With data.holdout_fraction, training skips the held-out documents
  and evaluation reads only those, of the training source (data/holdout.py).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
  holdout = for_split(data_cfg, split)
  if globs is not None and globs.startswith(data_spec.HUB_PREFIX):
    hub = data_spec.parse_hub_source(globs)
    found = Documents(globs, stream=HubStream(
      hub.path, hub.name, hub.split, hub.text_key or data_cfg.text_key, repeat=split == "train",
      stream=stream, streams=streams, doc_format=data_cfg.format,
      holdout=holdout))
  elif globs is not None:
    found = _open_globs(globs, "data.mixture", data_cfg.text_key, data_cfg.text_separator,
                        data_cfg.format, holdout)
  elif data_cfg.source == "files":
    key = "train_files" if split == "train" or holdout is not None else "eval_files"
    found = _open_globs(data_cfg[key], f"data.{key}", data_cfg.text_key,
                        data_cfg.text_separator, data_cfg.format, holdout)
  elif data_cfg.source == "hf":
    hf_split = data_cfg.hf_train_split if split == "train" else data_cfg.hf_eval_split
    name = f"{data_cfg.hf_path} ({hf_split})"
    if data_cfg.hf_streaming:
      found = Documents(name, stream=HubStream(
        data_cfg.hf_path, data_cfg.hf_name or None, hf_split, data_cfg.text_key,
        data_cfg.hf_data_files, repeat=split == "train", stream=stream,
        streams=streams, doc_format=data_cfg.format, holdout=holdout))
    else:
      skipped: collections.Counter = collections.Counter()
      found = Documents(name, skipped=skipped, docs=hf_documents(
        data_cfg.hf_path, data_cfg.hf_name or None, hf_split, data_cfg.text_key,
        data_cfg.hf_data_files, data_cfg.format, skipped, holdout))
  else:
    raise errors.ConfigError(
      f"data.source={data_cfg.source!r}: allowed: {', '.join(config.DATA_SOURCES)}")
  if found.docs is not None and not len(found.docs):
    among = f" among {holdout}" if holdout else ""
    raise DataError(f"the {split} split ({found.name}) has no documents{among}")
  if found.skipped:
    logging.warning("%s: skipped %s", found.name,
                    ", ".join(f"{n} {what}" for what, n in sorted(found.skipped.items())))
  return found


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[Document]:
  """Returns the texts (or conversations) of `split` from local files or a downloaded Hub
  dataset."""
  found = open_split(data_cfg, split)
  if found.docs is None or found.pretokenized:
    raise ValueError(f"the {split} split ({found.name}) is not random-access text")
  return found.docs


def _local_train_paths(data_cfg: ml_collections.ConfigDict) -> list[str] | None:
  """The paths of the (first) local training source; None for a Hub dataset."""
  if data_cfg.mixture:
    first = data_spec.parse_mixture(data_cfg.mixture)[0][0]
    return None if first.startswith(data_spec.HUB_PREFIX) else data_spec.expand_globs(
      first, "data.mixture")
  if data_cfg.source == "files":
    return data_spec.expand_globs(data_cfg.train_files, "data.train_files")
  return None


def pretokenized_dataset(data_cfg: ml_collections.ConfigDict) -> str | None:
  """The (first) pretokenized training dataset's directory, which holds its tokenizer, if the
  training data is one."""
  paths = _local_train_paths(data_cfg)
  if paths and shards.is_dataset(paths[0]):
    return paths[0]
  return None


def first_documents(data_cfg: ml_collections.ConfigDict, n: int) -> list[Document]:
  """Returns the first `n` training documents (fewer if the split is smaller), in order."""
  paths = _local_train_paths(data_cfg)
  if paths is None:  # the Hub: data.source, or the mixture's first source
    first = data_spec.parse_mixture(data_cfg.mixture)[0][0] if data_cfg.mixture else None
    found = open_split(data_cfg, "train", globs=first)
    if found.stream is not None:
      it = iter(found.stream)
      return [doc for doc, _ in itertools.islice(it, n)]
    return [found.docs[i] for i in range(min(n, len(found.docs)))]
  if any(os.path.isdir(p) for p in paths):
    raise DataError("the training data is pretokenized: set data.tokenizer to the tokenizer it "
                    "was prepared with (the dataset's directory holds it)")
  skipped: collections.Counter = collections.Counter()
  docs = list(itertools.islice(kept(read_files(
    paths, data_cfg.text_key, data_cfg.text_separator, skipped, data_cfg.format),
    for_split(data_cfg, "train")), n))
  if not docs:
    counts = ", ".join(f"{count} {what}" for what, count in sorted(skipped.items()))
    raise DataError(f"{', '.join(paths)}: no training document to read"
                    f"{f' (skipped {counts})' if counts else ''}")
  return docs

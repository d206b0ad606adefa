"""Document sources: what a split reads, from local files, pretokenized shards or the Hub.

A split opens as a `Documents`: either a random-access sequence (texts read from local files or
a downloaded Hub dataset, or token arrays of a pretokenized dataset), which the pipeline shuffles
globally and splits between hosts by index, or a `HubStream` of records streamed from the Hub,
which it shuffles in windows and which splits itself between hosts.

A document is a text (`data.format="text"`: the field `data.text_key`) or a conversation
(`data.format="chat"`: the field "messages", a list of {"role", "content"} turns with roles system,
user and assistant, an assistant turn optionally with "reasoning_content"), read as a tuple of
`Message`s.

Bad records never reach a worker: empty documents (and conversations), conversations without an
assistant turn and lines that are not valid UTF-8 are skipped and counted (`Documents.skipped`,
logged); a record without the field, a line that is not JSON, a turn with an unknown role, a
missing or non-string content or reasoning in another turn than the assistant's, a glob that
matches nothing or a split without documents is an error that names the file, the line and the
key.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
from absl import logging

from nanollama_jax import config
from nanollama_jax.data import DataError, HubUnreachable, shards
from nanollama_jax.data.holdout import Holdout, for_split, kept

SPLITS = ("train", "eval")
JSON_EXTENSIONS = (".jsonl", ".json")
TEXT_EXTENSIONS = (".txt",)
PARQUET_EXTENSIONS = (".parquet",)
EXTENSIONS = JSON_EXTENSIONS + TEXT_EXTENSIONS + PARQUET_EXTENSIONS
EMPTY, BAD_UTF8 = "empty documents", "lines that are not UTF-8"
NO_ASSISTANT = "conversations without an assistant turn"
MESSAGES_KEY, REASONING_KEY = "messages", "reasoning_content"  # the chat format's record fields
ROLES = ("system", "user", "assistant")


class Message(NamedTuple):
  """One turn of a conversation; only an assistant turn has reasoning ('' for none)."""
  role: str
  content: str
  reasoning: str = ""


Conversation = tuple[Message, ...]
Document = str | Conversation


def _field(text_key: str, doc_format: str) -> tuple[str, str]:
  """The record field that holds a document, and the config that names it."""
  if doc_format == "chat":
    return MESSAGES_KEY, "data.format='chat'"
  return text_key, "data.text_key"


def _field_named(text_key: str, doc_format: str) -> str:
  """How errors name the field: "data.text_key='text'" or "'messages' (data.format='chat')"."""
  field, named_by = _field(text_key, doc_format)
  return f"{named_by}={field!r}" if doc_format == "text" else f"{field!r} ({named_by})"


def _text_or_skip(text: Any, where: str, text_key: str, skipped: collections.Counter) -> str | None:
  if text is None or (isinstance(text, str) and not text.strip()):
    skipped[EMPTY] += 1
    return None
  if not isinstance(text, str):
    raise DataError(f"{where}: field {text_key!r} is a {type(text).__name__}, not a string")
  return text


def _message(turn: Any, where: str) -> Message:
  if not isinstance(turn, dict):
    raise DataError(f"{where}: a {type(turn).__name__}, not an object with 'role' and 'content'")
  role, content, reasoning = turn.get("role"), turn.get("content"), turn.get(REASONING_KEY)
  if role not in ROLES:
    raise DataError(f"{where}: role {role!r}; allowed: {', '.join(ROLES)}")
  if not isinstance(content, str):
    what = "missing" if content is None else f"a {type(content).__name__}, not a string"
    raise DataError(f"{where}: 'content' is {what}")
  if reasoning is not None and not (role == "assistant" and isinstance(reasoning, str)):
    raise DataError(f"{where}: {REASONING_KEY!r} ({type(reasoning).__name__}) in a turn of the "
                    f"{role}; it must be a string in an assistant turn")
  return Message(role, content, reasoning or "")


def _conversation_or_skip(messages: Any, where: str,
                          skipped: collections.Counter) -> Conversation | None:
  if messages is None or (isinstance(messages, list) and not messages):
    skipped[EMPTY] += 1
    return None
  if not isinstance(messages, list):
    raise DataError(f"{where}: field {MESSAGES_KEY!r} is a {type(messages).__name__}, not a list "
                    "of messages")
  conversation = tuple(_message(turn, f"{where}, message {i}")
                       for i, turn in enumerate(messages, 1))
  if all(m.role != "assistant" for m in conversation):
    skipped[NO_ASSISTANT] += 1
    return None
  return conversation


def _document_or_skip(value: Any, where: str, field: str, doc_format: str,
                      skipped: collections.Counter) -> Document | None:
  if doc_format == "chat":
    return _conversation_or_skip(value, where, skipped)
  return _text_or_skip(value, where, field, skipped)


def texts(docs: Iterable[Document]) -> list[str]:
  """The texts of documents: each text, and each turn's reasoning (if any) then its content."""
  out = []
  for doc in docs:
    if isinstance(doc, str):
      out.append(doc)
      continue
    for message in doc:
      out += [message.reasoning, message.content] if message.reasoning else [message.content]
  return out


def _decode(raw: bytes, skipped: collections.Counter) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    skipped[BAD_UTF8] += 1
    return None


def _json_lines(path: str, text_key: str, doc_format: str,
                skipped: collections.Counter) -> Iterator[Document]:
  field, named_by = _field(text_key, doc_format)
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      line = _decode(raw, skipped)
      if line is None or not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
          f"{path}, line {number}: no field {field!r} ({named_by}); the record has {keys}")
      doc = _document_or_skip(record[field], f"{path}, line {number}", field, doc_format, skipped)
      if doc is not None:
        yield doc


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


def _parquet(path: str, text_key: str, doc_format: str,
             skipped: collections.Counter) -> Iterator[Document]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  field, named_by = _field(text_key, doc_format)
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file that is not Parquet
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  columns = table.schema_arrow.names
  if field not in columns:
    raise DataError(f"{path}: no column {field!r} ({named_by}); columns: {', '.join(columns)}")
  row = 0
  for batch in table.iter_batches(columns=[field], batch_size=4096):
    for value in batch.column(0).to_pylist():
      row += 1
      doc = _document_or_skip(value, f"{path}, row {row}", field, doc_format, skipped)
      if doc is not None:
        yield doc


def read_files(paths: Sequence[str], text_key: str, separator: str = "",
               skipped: collections.Counter | None = None,
               doc_format: str = "text") -> Iterator[Document]:
  """Yields the documents of files in order (texts, or conversations with doc_format='chat');
  skipped records are counted in `skipped`."""
  skipped = collections.Counter() if skipped is None else skipped
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
      yield from _json_lines(path, text_key, doc_format, skipped)
    elif ext in TEXT_EXTENSIONS and doc_format == "chat":
      raise DataError(f"{path}: data.format='chat' reads conversations from JSON lines or Parquet "
                       "records with a 'messages' field, not from .txt files")
    elif ext in TEXT_EXTENSIONS:
      yield from _text_lines(path, separator, skipped)
    elif ext in PARQUET_EXTENSIONS:
      yield from _parquet(path, text_key, doc_format, skipped)
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
  field, _ = _field(text_key, doc_format)
  if field not in dataset.column_names:
    raise DataError(f"{_field_named(text_key, doc_format)} is not a column of {path} ({split}); "
                     f"columns: {', '.join(dataset.column_names)}")
  if doc_format == "text":
    dataset = dataset.select_columns([field])
    if holdout is not None:  # hashed once; `datasets` caches the kept rows by the call's inputs
      dataset = dataset.filter(_kept_texts, batched=True, batch_size=10_000,
                               fn_kwargs={"field": field, "holdout": holdout})
    return _Column(dataset, field)
  skipped = collections.Counter() if skipped is None else skipped
  docs = (_conversation_or_skip(value, f"{path} ({split}), row {row}", skipped)
          for row, value in enumerate(dataset[field], 1))
  return list(kept((doc for doc in docs if doc is not None), holdout))


class HubStream(grain.IterDataset):
  """The records of a Hub split streamed in order, as (document, epoch) pairs.

  With `repeat`, the stream starts over at its end and the epoch counts up. With
  `process_count` > 1 each process reads a disjoint share (whole files where the split has
  enough of them, else every n-th record). With a `holdout`, only the documents it keeps. The
  iterator's state is the `datasets` stream's own position, so a restore continues without
  reading the stream again from its start.
  """

  def __init__(self, path: str, name: str | None, split: str, text_key: str,
               data_files: str | Sequence[str] | None = None, repeat: bool = False,
               process_index: int = 0, process_count: int = 1, doc_format: str = "text",
               holdout: Holdout | None = None):
    super().__init__()
    self.path, self.name, self.split, self.text_key = path, name, split, text_key
    self.doc_format = doc_format
    self.holdout = holdout
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
    field, _ = _field(s.text_key, s.doc_format)
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
        raise DataError(f"{_field_named(s.text_key, s.doc_format)} is not a field of {s.path} "
                         f"({s.split}); fields: {', '.join(sorted(record))}")
      doc = _document_or_skip(record[field], f"{s.path} ({s.split})", field, s.doc_format,
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
  paths = config.expand_globs(globs, key)
  datasets_ = [p for p in paths if os.path.isdir(p)]
  if datasets_ and doc_format == "chat":
    raise config.ConfigError(f"{key}={globs!r}: {datasets_[0]} is a pretokenized dataset, which "
                             "holds no turns: data.format='chat' reads JSON lines or Parquet")
  if datasets_:
    not_prepared = [p for p in datasets_ if not shards.is_dataset(p)]
    if not_prepared:
      raise config.ConfigError(f"{key}={globs!r}: {not_prepared[0]} is a directory without "
                               f"{shards.INDEX}; write it with scripts/prepare_dataset.py")
    if len(datasets_) != len(paths):
      raise config.ConfigError(f"{key}={globs!r}: matches both pretokenized datasets and text "
                               "files; use one kind per split (or a data.mixture)")
    docs = shards.TokenDocuments(datasets_)
    return Documents(globs, docs=docs if holdout is None else docs.select(holdout.keeps))
  skipped: collections.Counter = collections.Counter()
  docs = list(kept(read_files(paths, text_key, separator, skipped, doc_format), holdout))
  return Documents(globs, docs=docs, skipped=skipped)


def open_split(data_cfg: ml_collections.ConfigDict, split: str, *, process_index: int = 0,
               process_count: int = 1, globs: str | None = None) -> Documents:
  """Opens the documents of `split` ('train' or 'eval'), or of a mixture's source `globs` (file
  globs or a Hub dataset "hf:...").

  Only a Hub stream uses the process index and count (it splits itself); the pipeline splits
  random-access documents. With data.holdout_fraction, training skips the held-out documents
  and evaluation reads only those, of the training source (data/holdout.py).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
  holdout = for_split(data_cfg, split)
  if globs is not None and globs.startswith(config.HUB_PREFIX):
    hub = config.parse_hub_source(globs)
    found = Documents(globs, stream=HubStream(
      hub.path, hub.name, hub.split, hub.text_key or data_cfg.text_key, repeat=split == "train",
      process_index=process_index, process_count=process_count, doc_format=data_cfg.format,
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
        data_cfg.hf_data_files, repeat=split == "train", process_index=process_index,
        process_count=process_count, doc_format=data_cfg.format, holdout=holdout))
    else:
      skipped: collections.Counter = collections.Counter()
      found = Documents(name, skipped=skipped, docs=hf_documents(
        data_cfg.hf_path, data_cfg.hf_name or None, hf_split, data_cfg.text_key,
        data_cfg.hf_data_files, data_cfg.format, skipped, holdout))
  else:
    raise config.ConfigError(
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


def first_documents(data_cfg: ml_collections.ConfigDict, n: int) -> list[Document]:
  """Returns the first `n` training documents (fewer if the split is smaller), in order."""
  paths = _local_train_paths(data_cfg)
  if paths is None:  # the Hub: data.source, or the mixture's first source
    first = config.parse_mixture(data_cfg.mixture)[0][0] if data_cfg.mixture else None
    found = open_split(data_cfg, "train", globs=first)
    if found.stream is not None:
      it = iter(found.stream)
      return [doc for doc, _ in itertools.islice(it, n)]
    return [found.docs[i] for i in range(min(n, len(found.docs)))]
  if any(os.path.isdir(p) for p in paths):
    raise DataError("the training data is pretokenized: set data.tokenizer to the model it was "
                     "prepared with (its tokenizer.model)")
  skipped: collections.Counter = collections.Counter()
  docs = list(itertools.islice(kept(read_files(
    paths, data_cfg.text_key, data_cfg.text_separator, skipped, data_cfg.format),
    for_split(data_cfg, "train")), n))
  if not docs:
    counts = ", ".join(f"{count} {what}" for what, count in sorted(skipped.items()))
    raise DataError(f"{', '.join(paths)}: no training document to read"
                    f"{f' (skipped {counts})' if counts else ''}")
  return docs

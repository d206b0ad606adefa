"""The grain input pipeline: documents -> shuffle -> tokenize -> pack into windows -> batch.

Each document becomes `[BOS] + tokens + [EOS]`; documents are concatenated into one stream that
is cut into windows of `seq_len + 1` tokens, each window starting `seq_len` tokens after the
previous one (consecutive windows share one token, so every token of the stream but the first
is a target exactly once). For a window `w`:

  inputs = w[:-1], targets = w[1:]          int32 [seq_len]
  segment_ids   1, 2, ... for each document piece in the window (0 on padding)
  positions     0, 1, ... within each piece: restart at every BOS and at the window start
  loss_mask     1.0 where the target is in the input's document; 0.0 on EOS -> next BOS and
                on padding

Documents longer than a window continue in the next one; none is dropped. Only the stream's
last window can be short: it is padded (pad id, segment 0, mask 0). The training stream
repeats forever, so it has none.
"""

from __future__ import annotations

import collections
import itertools
import signal
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from nanollama_jax.data import sources
from nanollama_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


# Documents per grain element: tokenising them together amortises the cost of handing elements
# from worker processes to the main one.
_DOCS_PER_CHUNK = 32


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """Ctrl-C reaches the whole process group: workers leave it to the trainer, which saves a
  checkpoint and then stops them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class _TokenizeChunk(grain.transforms.Map):
  """Maps texts to their BOS + tokens + EOS ids, concatenated, and the end of each document."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def map(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    t = self._tokenizer
    docs = [[t.bos_id, *t.encode(text), t.eos_id] for text in texts]
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32)
    return tokens, np.cumsum([len(doc) for doc in docs])


class _SplitChunk(grain.experimental.FlatMapTransform):
  """Splits a tokenised chunk back into one int32 array per document."""

  max_fan_out = _DOCS_PER_CHUNK

  def flat_map(self, chunk: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    tokens, ends = chunk
    return np.split(tokens, ends[:-1])


class _PackIterator(grain.DatasetIterator):
  """Cuts the concatenated token arrays of its parent into overlapping windows."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    # Documents not yet fully cut, each with the parent state from before it was read; the
    # next window starts at `_offset` in the first one.
    self._docs: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
    self._offset = 0

  def _read(self, need: int) -> int:
    """Reads documents until `need` tokens are buffered or the parent ends; returns the count."""
    have = sum(len(doc) for _, doc in self._docs) - self._offset
    while have < need:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        break
      self._docs.append((state, doc))
      have += len(doc)
    return have

  def __next__(self) -> dict[str, np.ndarray]:
    size = self._seq_len + 1
    if self._read(size) < 2:  # a single token left was the previous window's last target
      raise StopIteration
    tokens = np.full(size, self._pad_id, dtype=np.int32)
    segments = np.zeros(size, dtype=np.int32)
    positions = np.zeros(size, dtype=np.int32)
    filled, start = 0, self._offset
    for segment, (_, doc) in enumerate(self._docs, 1):
      piece = doc[start:start + size - filled]
      end = filled + len(piece)
      tokens[filled:end] = piece
      segments[filled:end] = segment
      positions[filled:end] = np.arange(len(piece))
      filled, start = end, 0
      if filled == size:
        break
    self._offset += self._seq_len
    while self._docs and self._offset >= len(self._docs[0][1]):
      self._offset -= len(self._docs.popleft()[1])
    same_doc = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
    return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "segment_ids": segments[:-1],
      "positions": positions[:-1],
      "loss_mask": same_doc.astype(np.float32),
    }

  def get_state(self) -> dict[str, Any]:
    parent = self._docs[0][0] if self._docs else self._parent.get_state()
    return {"parent": parent, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._docs.clear()
    self._offset = state["offset"]


class _PackIterDataset(grain.IterDataset):
  """Packs token arrays into windows; see the module docstring."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)


def windows(
  data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, num_workers: int = 0
) -> grain.IterDataset:
  """Returns the packed windows of a split: shuffled and repeated forever for 'train'."""
  docs = sources.documents(data_cfg, split)
  if not docs:
    raise ValueError(f"the {split} split has no documents")
  ds = grain.MapDataset.source(docs)
  if split == "train":
    ds = ds.shuffle(seed=data_cfg.shuffle_seed).repeat()  # a new order every epoch
  ds = ds.batch(_DOCS_PER_CHUNK, batch_fn=list).map(_TokenizeChunk(tokenizer))
  # No reader threads: they contend for the GIL with the tokenizer and slow it down; worker
  # processes are the way to scale tokenisation.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if num_workers:
    # grain 0.2.18 reads its absl flags when starting workers and fails on unparsed flags
    # (google/grain#1355) in programs that do not use absl.app: let it read the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=_ignore_sigint)
  ds = grain.experimental.FlatMapIterDataset(ds, _SplitChunk())
  return _PackIterDataset(ds, data_cfg.seq_len, tokenizer.pad_id)


def train_batches(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Iterator[Batch]:
  """Returns the endless, checkpointable iterator of batches of `data_cfg.batch_size` windows.

  With `data_cfg.num_workers` > 0, call its `close()` when done to stop the worker processes.
  """
  ds = windows(data_cfg, tokenizer, "train", data_cfg.num_workers)
  return iter(ds.batch(data_cfg.batch_size, drop_remainder=True))


def _pad_rows(batch: Batch, rows: int, pad_id: int) -> Batch:
  missing = rows - len(batch["inputs"])
  fill = {"inputs": pad_id, "targets": pad_id}
  return {
    k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
    for k, v in batch.items()
  }


def eval_batches(
  data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, max_batches: int
) -> list[Batch]:
  """Returns the first `max_batches` batches of the eval split, in order, the last one padded."""
  if max_batches < 1:
    raise ValueError(f"max_batches={max_batches}: must be >= 1")
  # In-process: evaluation reads few documents, not worth starting worker processes for.
  ds = windows(data_cfg, tokenizer, "eval").batch(data_cfg.batch_size)
  batches = list(itertools.islice(ds, max_batches))
  batches[-1] = _pad_rows(batches[-1], data_cfg.batch_size, tokenizer.pad_id)
  return batches

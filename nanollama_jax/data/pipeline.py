"""The grain input pipeline: documents -> shuffle -> tokenize -> pack into windows -> batch.

Each document becomes `[BOS] + tokens + [EOS]` and is packed into windows of `seq_len + 1`
tokens. For a window `w`:

  inputs = w[:-1], targets = w[1:]          int32 [seq_len]
  segment_ids   1, 2, ... for each document piece in the window (0 on padding)
  positions     0, 1, ... within each piece: restart at every BOS and at the window start
  loss_mask     1.0 where the target is in the input's document and is trained; 0.0 on
                EOS -> next BOS and on padding

Every token carries a "trained" flag through tokenization and packing: 1 for every token of a
text, and for a conversation (`data.format="chat"`, data/chat.py) 1 only on what the assistant
writes, so a chat run learns and is evaluated on the assistant's tokens alone.

Two packers (`data.packing`), neither of which drops a token:

  concat     documents are concatenated into one stream cut into windows, each starting
             `seq_len` tokens after the previous one (consecutive windows share one token, so
             every token but the first is a target exactly once). No padding but at the end
             of a finite split.
  first_fit  documents longer than a window are cut into pieces of `seq_len + 1` tokens that
             overlap by one (again every token is a target once); pieces are placed into the
             first of `data.pack_bins` open windows with room, and the bins are emitted when a
             piece fits in none. No document is split at a window edge that it did not need to
             be; the price is padding, which the training iterator reports.

The training data is read as `data.streams` streams (by default, as many as the processes that
read distinct rows when the run started). Stream s reads documents `s::streams` of a
random-access source, shuffled in a new order every epoch (a Hub stream splits itself the same
way and is shuffled in windows of `data.shuffle_window` documents), packs them, and fills rows
`s * B/streams ... (s + 1) * B/streams` of every global batch of B rows. A process runs the
streams that fill its rows, several when it holds more rows than a stream fills, and one whole
when it holds fewer (keeping its rows of it). So the global batches do not depend on how many
processes read them: a run resumed on another slice (more or fewer hosts) continues the same
batches. A mixture packs each source on its own and draws windows from them by weight. Every
stage is a grain dataset whose iterator state is part of the checkpoint, one state per stream,
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from nanollama_jax import data_spec, errors
from nanollama_jax.errors import DataError
from nanollama_jax.data import chat, sources
from nanollama_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # tokens, trained, ends, epochs
# Every batch of the pipeline: these arrays, each [batch rows, data.seq_len].
DTYPES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
          "positions": np.int32, "loss_mask": np.float32}
KEYS = tuple(DTYPES)


def batch_shapes(data_cfg: ml_collections.ConfigDict, rows: int | None = None
                 ) -> dict[str, tuple[tuple[int, int], np.dtype]]:
  """(shape, dtype) of each array of a batch of `rows` (default: the global batch_size)."""
  shape = (data_cfg.batch_size if rows is None else rows, data_cfg.seq_len)
  return {key: (shape, np.dtype(dtype)) for key, dtype in DTYPES.items()}


def single_document_rows(tokens_BxT1: np.ndarray) -> Batch:
  """A batch whose every row is one whole document, from B rows of T + 1 tokens."""
  B, T = tokens_BxT1.shape[0], tokens_BxT1.shape[1] - 1
  return {"inputs": tokens_BxT1[:, :-1].astype(DTYPES["inputs"]),
          "targets": tokens_BxT1[:, 1:].astype(DTYPES["targets"]),
          "segment_ids": np.ones((B, T), DTYPES["segment_ids"]),
          "positions": np.broadcast_to(np.arange(T, dtype=DTYPES["positions"]), (B, T)).copy(),
          "loss_mask": np.ones((B, T), DTYPES["loss_mask"])}


# Documents per grain element: tokenising them together amortises the cost of handing elements
# from worker processes to the main one.
_DOCS_PER_CHUNK = 32


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Ctrl-C reaches the whole process group: workers leave it to the trainer, which saves a
  checkpoint and then stops them. Each worker tokenizes on one thread (the `tokenizers` library
  would start a thread per core in every worker): workers are the parallelism."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _WithEpoch(grain.transforms.MapWithIndex):
  """Pairs each document of a repeated dataset with its epoch: index // documents per epoch."""

  def __init__(self, per_epoch: int):
    self._per_epoch = per_epoch

  def map_with_index(self, index: int, doc: Any) -> tuple[Any, int]:
    return doc, index // self._per_epoch


class _TokenizeChunk(grain.transforms.Map):
  """Maps (document, epoch) pairs to their tokens concatenated, the tokens' trained flags (uint8),
  each document's end, and each one's epoch. A text becomes BOS + ids + EOS, all trained; a
  conversation its chat format (data/chat.py); a token array (pretokenized) is used as it is,
  with BOS and EOS. Documents without a token are dropped."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._chat = None  # the chat format, made at the first conversation

  def map(self, chunk: list[tuple[Any, int]]) -> Chunk:
    t = self._tokenizer
    texts = [doc for doc, _ in chunk if isinstance(doc, str)]
    encoded = iter(t.encode_batch(texts) if texts else [])
    bos, eos = np.array([t.bos_id], np.int32), np.array([t.eos_id], np.int32)
    pieces, flags, ends, epochs, total = [], [], [], [], 0
    for doc, epoch in chunk:
      if isinstance(doc, (str, np.ndarray)):
        ids = next(encoded) if isinstance(doc, str) else doc
        if not len(ids):
          continue
        pieces += (bos, np.asarray(ids, np.int32), eos)
        flags.append(np.ones(len(ids) + 2, np.uint8))
      else:
        self._chat = self._chat or chat.formatter(t)
        tokens, trained = self._chat.encode(doc)
        pieces.append(tokens)
        flags.append(trained)
      total += len(flags[-1])
      ends.append(total)
      epochs.append(epoch)
    tokens = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else bos[:0]
    trained = np.concatenate(flags) if flags else np.zeros(0, np.uint8)
    return tokens, trained, np.array(ends, np.int64), np.array(epochs, np.int32)


class _SplitChunk(grain.experimental.FlatMapTransform):
  """Splits a tokenised chunk into its documents, or into pieces of at most `piece_len` tokens
  that overlap by one (for first-fit packing)."""

  max_fan_out = _DOCS_PER_CHUNK  # documents per chunk; pieces are not counted (iter datasets)

  def __init__(self, piece_len: int | None = None):
    self._piece_len = piece_len

  def flat_map(self, chunk: Chunk) -> list[dict[str, Any]]:
    tokens, trained, ends, epochs = chunk
    cuts = ends[:-1]
    out = []
    for doc, doc_trained, epoch in zip(np.split(tokens, cuts), np.split(trained, cuts), epochs):
      if self._piece_len is None:
        out.append({"tokens": doc, "trained": doc_trained, "epoch": int(epoch)})
        continue
      step = self._piece_len - 1
      for start in range(0, max(len(doc) - 1, 1), step):
        end = start + self._piece_len
        out.append({"tokens": doc[start:end], "trained": doc_trained[start:end],
                    "epoch": int(epoch)})
    return out


class _PackIterator(grain.DatasetIterator):
  """Cuts the concatenated documents of its parent into overlapping windows (`concat`)."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    # Documents not yet fully cut, each with the parent state from before it was read; the
    # next window starts at `_offset` in the first one.
    self._docs: collections.deque[tuple[Any, dict[str, Any]]] = collections.deque()
    self._offset = 0

  def _read(self, need: int) -> int:
    """Reads documents until `need` tokens are buffered or the parent ends; returns the count."""
    have = sum(len(doc["tokens"]) for _, doc in self._docs) - self._offset
    while have < need:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        break
      self._docs.append((state, doc))
      have += len(doc["tokens"])
    return have

  def __next__(self) -> dict[str, Any]:
    size = self._seq_len + 1
    if self._read(size) < 2:  # a single token left was the previous window's last target
      raise StopIteration
    tokens = np.full(size, self._pad_id, dtype=np.int32)
    trained = np.zeros(size, dtype=np.uint8)
    segments = np.zeros(size, dtype=np.int32)
    positions = np.zeros(size, dtype=np.int32)
    filled, start, epoch = 0, self._offset, 0
    for segment, (_, doc) in enumerate(self._docs, 1):
      piece = doc["tokens"][start:start + size - filled]
      end = filled + len(piece)
      tokens[filled:end] = piece
      trained[filled:end] = doc["trained"][start:start + len(piece)]
      segments[filled:end] = segment
      positions[filled:end] = np.arange(len(piece))
      filled, start, epoch = end, 0, max(epoch, doc["epoch"])
      if filled == size:
        break
    self._offset += self._seq_len
    while self._docs and self._offset >= len(self._docs[0][1]["tokens"]):
      self._offset -= len(self._docs.popleft()[1]["tokens"])
    return _window(tokens, segments, positions, trained, epoch)

  def get_state(self) -> dict[str, Any]:
    parent = self._docs[0][0] if self._docs else self._parent.get_state()
    return {"parent": parent, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._docs.clear()
    self._offset = state["offset"]


def _window(tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray,
            trained: np.ndarray, epoch: int) -> dict[str, Any]:
  """The training example of a packed window of seq_len + 1 tokens and their trained flags."""
  same_doc = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
  return {
    "inputs": tokens[:-1],
    "targets": tokens[1:],
    "segment_ids": segments[:-1],
    "positions": positions[:-1],
    "loss_mask": (same_doc & (trained[1:] > 0)).astype(np.float32),
    "epoch": np.int32(epoch),
  }


class _PackIterDataset(grain.IterDataset):
  """Packs documents into windows by concatenating and splitting; see the module docstring."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)


class _FromBins(grain.transforms.Map):
  """A first-fit bin (grain's packed features) as a training window."""

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, Any]:
    return _window(packed["tokens"].astype(np.int32), packed["tokens_segment_ids"].astype(np.int32),
                   packed["tokens_positions"].astype(np.int32), packed["trained"],
                   max(packed["epoch"]))


class _Tag(grain.transforms.Map):
  def __init__(self, source: int):
    self._source = source

  def map(self, window: dict[str, Any]) -> dict[str, Any]:
    return {**window, "source": np.int32(self._source)}


def _check_tokenizer(found: sources.Documents, tokenizer: Tokenizer) -> None:
  if found.pretokenized and found.docs.tokenizer_sha256 != tokenizer.fingerprint:
    raise DataError(
      f"{found.name} was prepared with another tokenizer than this run's "
      f"({tokenizer.describe()}): set data.tokenizer to the dataset's directory (it holds its "
      "tokenizer), or prepare it again with this one")


def _mp_prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  # grain 0.2.18 reads its absl flags when starting workers and fails on unparsed flags
  # (google/grain#1355) in programs that do not use absl.app: let it read the defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=_init_worker)


def _windows_of(found: sources.Documents, data_cfg: ml_collections.ConfigDict,
                tokenizer: Tokenizer, train: bool, seed: int, num_workers: int,
                stream: int, streams: int) -> grain.IterDataset:
  """Packed windows of one source: its documents, stream `stream` of `streams` when training."""
  _check_tokenizer(found, tokenizer)
  if found.stream is not None:
    ds = found.stream  # a Hub stream splits into data streams itself, and repeats when training
    if train:
      ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=data_cfg.shuffle_window,
                                                       seed=seed)
    # In-process: a stream cannot be split between grain workers.
    ds = ds.batch(_DOCS_PER_CHUNK, batch_fn=list).map(_TokenizeChunk(tokenizer))
  else:
    ds = grain.MapDataset.source(found.docs)
    if train and streams > 1:
      ds = ds[stream::streams]
      if not len(ds):
        raise DataError(f"{found.name}: fewer documents than the {streams} data streams")
    per_epoch = len(ds)
    if train:
      ds = ds.shuffle(seed=seed).repeat()  # a new order every epoch
    ds = ds.map_with_index(_WithEpoch(per_epoch))
    ds = ds.batch(_DOCS_PER_CHUNK, batch_fn=list).map(_TokenizeChunk(tokenizer))
    # No reader threads: they contend for the GIL with the tokenizer and slow it down; worker
    # processes are the way to scale tokenisation.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
    if num_workers:
      ds = _mp_prefetch(ds, num_workers)
  size = data_cfg.seq_len + 1
  concat = data_cfg.packing == "concat"
  ds = grain.experimental.FlatMapIterDataset(ds, _SplitChunk(None if concat else size))
  if concat:
    return _PackIterDataset(ds, data_cfg.seq_len, tokenizer.pad_id)
  # "trained" is packed beside the tokens, as a sequence meta-feature (no segment ids of its own).
  ds = grain.experimental.FirstFitPackIterDataset(
    ds, length_struct={"tokens": size, "trained": size}, num_packing_bins=data_cfg.pack_bins,
    shuffle_bins=False, padding_struct={"tokens": tokenizer.pad_id, "trained": 0},
    meta_features=("epoch", "trained"))
  return ds.map(_FromBins())


def _train_sources(data_cfg: ml_collections.ConfigDict, stream: int,
                   streams: int) -> tuple[list[sources.Documents], list[float]]:
  if not data_cfg.mixture:
    return [sources.open_split(data_cfg, "train", stream=stream,
                               streams=streams)], [1.0]
  parts = data_spec.parse_mixture(data_cfg.mixture)
  found = [sources.open_split(data_cfg, "train", stream=stream, streams=streams,
                              globs=globs) for globs, _ in parts]
  return found, [weight for _, weight in parts]


def windows(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str,
            num_workers: int = 0, stream: int = 0,
            streams: int = 1) -> tuple[grain.IterDataset, list[str]]:
  """Returns the packed windows of a split and the names of its sources.

  'train' is shuffled, repeated forever, stream `stream` of `streams`, and mixed when
  data.mixture is set; 'eval' is every document once, in order, on every process. Each window also carries
  `epoch` (of its newest document) and `source` (the index of its source).
  """
  if data_cfg.format == "chat":
    chat.formatter(tokenizer)  # refuses a tokenizer without a chat format before any reading
  if split == "train":
    found, weights = _train_sources(data_cfg, stream, streams)
  else:
    found, weights = [sources.open_split(data_cfg, split)], [1.0]
  parts = [
    _windows_of(f, data_cfg, tokenizer, split == "train", data_cfg.shuffle_seed + i,
                num_workers, stream, streams).map(_Tag(i))
    for i, f in enumerate(found)
  ]
  ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
  return ds, [f.name for f in found]


def stream_rows(batch_size: int, streams: int, share: int, shares: int
                ) -> list[tuple[int, slice]]:
  """The streams that fill share `share` of `shares` of the global batch's rows, each with the
  rows of its own batch (of batch_size / streams) that fall in the share."""
  per_stream, per_share = batch_size // streams, batch_size // shares
  start, stop = share * per_share, (share + 1) * per_share
  return [(s, slice(max(start, s * per_stream) - s * per_stream,
                    min(stop, (s + 1) * per_stream) - s * per_stream))
          for s in range(start // per_stream, (stop - 1) // per_stream + 1)]


def stream_writers(blocks: Sequence[tuple[int, int]], batch_size: int, streams: int) -> list[int]:
  """For each stream, the process that saves its position in a checkpoint: the first whose rows
  (`blocks[process] = (start, stop)`) hold the stream's first row."""
  per_stream = batch_size // streams
  return [min(p for p, (start, stop) in enumerate(blocks) if start <= s * per_stream < stop)
          for s in range(streams)]


class Batches(Iterator[Batch]):
  """This process's endless, checkpointable stream of training batches: its rows of each global
  batch, read from the data streams that fill them (see the module docstring).

  Besides the batches it counts, for the run's logs, the epoch each source has reached (the
  epoch of the newest document read from it, from 0) and the padding fraction of the windows
  it returned. `get_state()` is JSON-serialisable, one state per stream read; call `close()` to
  stop worker processes.
  """

  def __init__(self, parts: Sequence[tuple[int, grain.IterDataset, slice]], streams: int,
               names: Sequence[str], padded: bool = False):
    self.streams, self._padded = streams, padded
    self._parts = [(s, iter(ds), rows) for s, ds, rows in parts]
    self.names = list(names)
    # Per stream, over all its rows: part of its state, so it does not depend on the layout.
    self._epochs = {s: [0] * len(self.names) for s, _, _ in parts}
    self.windows = np.zeros(len(self.names), np.int64)  # returned, per source
    self._tokens = 0
    self._padding = 0

  @property
  def read(self) -> list[int]:
    """The streams this process reads."""
    return [s for s, _, _ in self._parts]

  def __next__(self) -> Batch:
    kept = []
    for s, it, rows in self._parts:
      batch = next(it)
      sources_B, epochs_B = batch.pop("source"), batch.pop("epoch")
      for source, epoch in zip(sources_B.tolist(), epochs_B.tolist()):
        self._epochs[s][source] = max(self._epochs[s][source], epoch)
      for source in sources_B[rows].tolist():
        self.windows[source] += 1
      kept.append({k: v[rows] for k, v in batch.items()})
    batch = kept[0] if len(kept) == 1 else {k: np.concatenate([b[k] for b in kept])
                                            for k in kept[0]}
    self._tokens += batch["segment_ids"].size
    self._padding += int((batch["segment_ids"] == 0).sum())
    return batch

  @property
  def epochs(self) -> list[int]:
    """The epoch each source has reached, over the streams this process reads."""
    return [max(e[i] for e in self._epochs.values()) for i in range(len(self.names))]

  @property
  def epoch(self) -> int:
    """The epoch of the first source (the only one without a mixture)."""
    return self.epochs[0]

  @property
  def padding_fraction(self) -> float:
    """The share of input positions that were padding, over the batches returned so far."""
    return self._padding / max(self._tokens, 1)

  def stats(self) -> dict[str, Any]:
    """The numbers a training row logs of its data: the epoch, and the padding of a packer
    that pads (first_fit)."""
    return {"epoch": self.epoch, **({"padding": self.padding_fraction} if self._padded else {})}

  def get_state(self, streams: set[int] | None = None) -> dict[str, Any]:
    """{"streams": count, "positions": {stream: its state}} for the streams this process reads,
    or for those of them in `streams` (the ones whose position this process saves)."""
    return {"streams": self.streams,
            "positions": {str(s): {"pipeline": it.get_state(), "epochs": list(self._epochs[s])}
                          for s, it, _ in self._parts if streams is None or s in streams}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves every stream this process reads to its position in `state` (which may hold more
    streams: a checkpoint holds them all)."""
    positions = state.get("positions") if isinstance(state, dict) else None
    if not isinstance(positions, dict) or state.get("streams") != self.streams or any(
        set(positions.get(str(s), ())) != {"pipeline", "epochs"}
        or len(positions[str(s)]["epochs"]) != len(self.names) for s in self.read):
      raise DataError("the checkpoint's data-iterator state does not match this pipeline (a "
                      "checkpoint of an older version, or data.mixture or data.streams changed)")
    for s, it, _ in self._parts:
      it.set_state(positions[str(s)]["pipeline"])
      self._epochs[s] = list(positions[str(s)]["epochs"])

  def close(self) -> None:
    for _, it, _ in self._parts:
      close = getattr(it, "close", None)
      if close is not None:
        close()


def train_batches(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, share: int = 0,
                  shares: int = 1, streams: int | None = None) -> Batches:
  """Returns the batches of share `share` of `shares` of the global batch's rows (a process's
  rows: see sharding.data_shard), read from `streams` data streams (default: `shares`).

  With data.num_workers > 0, call its `close()` when done to stop the worker processes.
  """
  streams = streams or shares
  for n, what in ((shares, "processes that read distinct rows"), (streams, "data streams")):
    if data_cfg.batch_size % n:
      raise errors.ConfigError(f"data.batch_size={data_cfg.batch_size}: must be divisible by the "
                               f"{n} {what}")
  parts, names = [], []
  for s, rows in stream_rows(data_cfg.batch_size, streams, share, shares):
    ds, names = windows(data_cfg, tokenizer, "train", data_cfg.num_workers, s, streams)
    parts.append((s, ds.batch(data_cfg.batch_size // streams, drop_remainder=True), rows))
  return Batches(parts, streams, names, padded=data_cfg.packing == "first_fit")


def resume(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, share: int, shares: int,
           state: dict[str, Any] | None) -> Batches:
  """The training batches of share `share` of `shares` of the rows, at a checkpoint's position
  `state` (None: from the start).

  The streams are data.streams, else the checkpoint's, else one per share: the batches do not
  depend on the number of processes, so a position carries over to any slice. Only an explicit
  data.streams that differs from the checkpoint's, or a batch size its streams do not divide,
  starts the data over, which is said in one warning line.
  """
  batch_size, asked = data_cfg.batch_size, data_cfg.streams
  streams = asked or shares
  if state is not None:
    saved = state["streams"]
    if asked not in (0, saved):
      logging.warning("data: data.streams=%d, but the checkpoint holds the positions of %d data "
                      "streams: the data is split anew and starts over from its beginning "
                      "(documents trained on before are seen again)", asked, saved)
      state = None
    elif batch_size % saved:
      logging.warning("data: the checkpoint's %d data streams do not divide data.batch_size=%d: "
                      "the data is split into %d streams and starts over from its beginning "
                      "(documents trained on before are seen again)", saved, batch_size, streams)
      state = None
    else:
      streams = saved
  if shares > 1:
    logging.info("data: this process reads share %d of %d", share, shares)
  batches = train_batches(data_cfg, tokenizer, share, shares, streams)
  if streams < shares:
    logging.info("data: %d processes read distinct rows of each batch, from %d data stream(s) "
                 "(data.streams is fixed at a run's first start): this process reads stream(s) "
                 "%s whole and keeps its rows", shares, streams, batches.read)
  if state is not None:
    batches.set_state(state)
  return batches


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
  """Returns the first `max_batches` global batches of the eval split, in order, the last one
  padded: the same batches at every evaluation, on every process."""
  if max_batches < 1:
    raise errors.UsageError(f"max_batches={max_batches}: must be >= 1")
  # In-process: evaluation reads few documents, not worth starting worker processes for.
  ds, _ = windows(data_cfg, tokenizer, "eval")
  batches = []
  for batch in ds.batch(data_cfg.batch_size):
    batches.append({k: batch[k] for k in KEYS})
    if len(batches) == max_batches:
      break
  batches[-1] = _pad_rows(batches[-1], data_cfg.batch_size, tokenizer.pad_id)
  return batches

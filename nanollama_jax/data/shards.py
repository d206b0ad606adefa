"""Pretokenized datasets: token ids written once by scripts/prepare_dataset.py, read by index.

A dataset is a directory:

  index.json          format, dtype, vocabulary size, the tokenizer's fingerprint (the SHA-256
                      of its model file), counts, and the list of shards
  tokenizer.model     the tokenizer the ids come from: its own files (tokenizer.model, or
  (or tokenizer.json) tokenizer.json and its configuration; data/tokenizer_source.py)
  tokens-00000.bin    the token ids of whole documents back to back, without BOS/EOS, as raw
                      little-endian uint16 (vocabularies up to 65,536) or uint32
  offsets-00000.npy   int64 [documents + 1]: where each document starts in the .bin file

The .bin files are memory-mapped, so reading a document at a random position costs one slice:
a run neither tokenises on the fly nor holds the corpus in memory, and the global shuffle and
the per-host split are index arithmetic.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from nanollama_jax.errors import DataError
from nanollama_jax.data.tokenizer import Tokenizer

INDEX = "index.json"
FORMAT = "nanollama-tokens"
VERSION = 1


def is_dataset(path: str) -> bool:
  """Whether `path` is a directory written by `ShardWriter`."""
  return os.path.isfile(os.path.join(path, INDEX))


def read_index(path: str) -> dict[str, Any]:
  try:
    with open(os.path.join(path, INDEX), encoding="utf-8") as f:
      index = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a readable pretokenized dataset ({e})") from None
  if index.get("format") != FORMAT or index.get("version") != VERSION:
    raise DataError(f"{path}: {INDEX} is not a {FORMAT} v{VERSION} index; rewrite it with "
                    "scripts/prepare_dataset.py")
  return index


class ShardWriter:
  """Writes documents' token ids into a new dataset directory, shard by shard.

  Everything goes to `<out_dir>.tmp` first and is renamed when `close()` succeeds, so a
  directory with an index is always complete.
  """

  def __init__(self, out_dir: str, tokenizer: Tokenizer, shard_tokens: int = 100_000_000,
               overwrite: bool = False, source: dict[str, Any] | None = None):
    if os.path.exists(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} exists: choose a new directory or pass --overwrite")
    self._out_dir = out_dir.rstrip("/")
    self._tmp = self._out_dir + ".tmp"
    shutil.rmtree(self._tmp, ignore_errors=True)
    os.makedirs(self._tmp)
    for name, blob in tokenizer.files.items():
      with open(os.path.join(self._tmp, name), "wb") as f:
        f.write(blob)
    vocab_size = tokenizer.vocab_size
    self._dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    self._index: dict[str, Any] = {
      "format": FORMAT, "version": VERSION, "dtype": self._dtype.str, "vocab_size": vocab_size,
      "tokenizer_sha256": tokenizer.fingerprint, "documents": 0, "tokens": 0, "shards": [],
      "source": source or {},
    }
    self._shard_tokens = shard_tokens
    self._pending: list[np.ndarray] = []
    self._pending_tokens = 0

  def add(self, docs: Iterable[Sequence[int] | np.ndarray]) -> None:
    for doc in docs:
      ids = np.asarray(doc, dtype=np.int64)
      if len(ids) and (ids.min() < 0 or ids.max() >= self._index["vocab_size"]):
        raise DataError(f"token id out of range [0, {self._index['vocab_size']})")
      self._pending.append(ids.astype(self._dtype))
      self._pending_tokens += len(ids)
      if self._pending_tokens >= self._shard_tokens:
        self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    n = len(self._index["shards"])
    tokens_name, offsets_name = f"tokens-{n:05d}.bin", f"offsets-{n:05d}.npy"
    offsets = np.zeros(len(self._pending) + 1, np.int64)
    np.cumsum([len(d) for d in self._pending], out=offsets[1:])
    with open(os.path.join(self._tmp, tokens_name), "wb") as f:
      for doc in self._pending:
        f.write(doc.tobytes())
    np.save(os.path.join(self._tmp, offsets_name), offsets)
    self._index["shards"].append({"tokens": tokens_name, "offsets": offsets_name,
                                  "documents": len(self._pending), "num_tokens": int(offsets[-1])})
    self._index["documents"] += len(self._pending)
    self._index["tokens"] += int(offsets[-1])
    self._pending, self._pending_tokens = [], 0

  def close(self, **extra: Any) -> dict[str, Any]:
    """Writes the last shard and the index, then moves the directory into place."""
    self._flush()
    if not self._index["documents"]:
      shutil.rmtree(self._tmp)
      raise DataError("no documents to write")
    self._index.update(extra)
    with open(os.path.join(self._tmp, INDEX), "w", encoding="utf-8") as f:
      json.dump(self._index, f, indent=2)
    if os.path.exists(self._out_dir):
      shutil.rmtree(self._out_dir)
    os.replace(self._tmp, self._out_dir)
    return self._index

  def abort(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)


class TokenDocuments(Sequence[np.ndarray]):
  """The documents of one or more pretokenized datasets, as int32 token arrays, by index.

  The token files are opened lazily in each process, so pickling one (for grain worker
  processes) sends only the paths and the offsets.
  """

  def __init__(self, dirs: Sequence[str]):
    self.dirs = list(dirs)
    self.indexes = [read_index(d) for d in self.dirs]
    hashes = {i["tokenizer_sha256"] for i in self.indexes}
    if len(hashes) > 1:
      raise DataError(f"{', '.join(self.dirs)}: written with different tokenizers; prepare them "
                      "with one")
    self.tokenizer_sha256 = hashes.pop()
    self.vocab_size = max(i["vocab_size"] for i in self.indexes)
    self._files: list[tuple[str, np.dtype]] = []
    offsets = []
    for d, index in zip(self.dirs, self.indexes):
      for shard in index["shards"]:
        self._files.append((os.path.join(d, shard["tokens"]), np.dtype(index["dtype"])))
        offsets.append(np.load(os.path.join(d, shard["offsets"])))
    self._offsets = offsets
    # Global document index -> shard: the first index of each shard.
    self._first = np.cumsum([0] + [len(o) - 1 for o in offsets])
    self._maps: list[np.memmap] | None = None
    self._kept: np.ndarray | None = None  # the documents a `select` keeps, by global index

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_maps"] = None
    return state

  def _open(self) -> list[np.memmap]:
    if self._maps is None:
      self._maps = [np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path)
                    else np.zeros(0, dtype) for path, dtype in self._files]
    return self._maps

  def __len__(self) -> int:
    return int(self._first[-1]) if self._kept is None else len(self._kept)

  @property
  def num_tokens(self) -> int:
    """The tokens of all the datasets' documents (those a `select` left out too)."""
    return sum(int(o[-1]) for o in self._offsets)

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of {len(self)}")
    if self._kept is not None:
      index = int(self._kept[index])
    shard = int(np.searchsorted(self._first, index, side="right")) - 1
    i = index - self._first[shard]
    start, end = self._offsets[shard][i], self._offsets[shard][i + 1]
    return np.asarray(self._open()[shard][start:end], dtype=np.int32)

  def select(self, keep: Callable[[np.ndarray], bool]) -> TokenDocuments:
    """A view of the documents whose token ids `keep` accepts, in order (read once, shard by
    shard, in the shards' own dtype)."""
    kept = [first + i for first, offsets, tokens in zip(self._first, self._offsets, self._open())
            for i in range(len(offsets) - 1) if keep(tokens[offsets[i]:offsets[i + 1]])]
    view = copy.copy(self)
    view._kept = np.array(kept, np.int64)
    return view

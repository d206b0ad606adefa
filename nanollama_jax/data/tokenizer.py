"""The sentencepiece tokenizer: loading, training from the corpus, and the workdir's copy."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
import sentencepiece as spm
from absl import logging

from nanollama_jax import errors, paths
from nanollama_jax import workdir as workdir_lib
from nanollama_jax.data import DataError, records, sources

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# The chat format's markers (data/chat.py), reserved in every tokenizer trained here with the ids
# that follow PAD_ID (4 to 9): sentencepiece control symbols, whole pieces that no text encodes to
# (not even the marker strings themselves) and that decode to nothing.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_OF_TURN_ID, THINK_ID, END_THINK_ID = range(
  PAD_ID + 1, PAD_ID + 1 + len(CHAT_TOKENS))


class Tokenizer:
  """A sentencepiece model: text to token ids and back. Picklable for grain workers."""

  def __init__(self, model_path: str):
    self._proto = paths.read_bytes(model_path)
    self.model_path = model_path
    self._load()

  def _load(self) -> None:
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except RuntimeError as e:
      raise DataError(f"{self.model_path}: not a sentencepiece model ({e})") from None

  def __getstate__(self) -> dict[str, Any]:
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.model_path, self._proto = state["model_path"], state["proto"]
    self._load()

  @property
  def proto(self) -> bytes:
    """The serialized model, as stored in the .model file."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def has_chat_tokens(self) -> bool:
    """Whether CHAT_TOKENS are control symbols at their ids (tokenizers trained before they were
    reserved have ordinary pieces there)."""
    sp = self._sp
    return sp.vocab_size() > END_THINK_ID and all(
      sp.id_to_piece(i) == piece and sp.is_control(i)
      for i, piece in enumerate(CHAT_TOKENS, SYSTEM_ID))

  def require_chat_tokens(self) -> None:
    """Raises DataError unless the tokenizer has the chat tokens."""
    if not self.has_chat_tokens:
      raise DataError(
        f"{self.model_path} has no chat tokens ({' '.join(CHAT_TOKENS)} as control symbols at "
        f"ids {SYSTEM_ID}-{END_THINK_ID}): it was trained before they were reserved. The chat "
        "format needs a tokenizer trained by this version (scripts/train_tokenizer.py, or a run "
        "without data.tokenizer) and a model pretrained with it")

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the token ids of each text (one call into sentencepiece for all of them)."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of token ids; BOS, EOS, padding and chat tokens decode to nothing."""
    return self._sp.decode([int(i) for i in ids])


def workdir_tokenizer(workdir: str) -> Tokenizer:
  """The tokenizer a training run in `workdir` used (and keeps there)."""
  path = paths.join(workdir, workdir_lib.TOKENIZER)
  if not paths.exists(path):
    raise errors.CheckpointError(
      f"{workdir} has no {workdir_lib.TOKENIZER}: not a training run's workdir")
  return Tokenizer(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
  """Trains a byte-fallback BPE model of exactly `vocab_size` pieces and writes it to `out_path`."""
  # Lines, not whole documents, are the training sentences: sentencepiece skips sentences over
  # max_sentence_length, and "\n" is left to byte fallback (<0x0A>), as in Llama's tokenizer.
  lines = [line for text in texts for line in text.split("\n") if line]
  model_bytes = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model_bytes,
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=True,
      byte_fallback=True,
      character_coverage=0.9995,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,  # lines are trained without the space it would add at their start
      allow_whitespace_only_pieces=True,
      split_digits=True,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      pad_id=PAD_ID,
      control_symbols=list(CHAT_TOKENS),
      minloglevel=2,
    )
  except RuntimeError as e:
    reason = str(e).rsplit("] ", 1)[-1].strip() or "no training text"
    raise DataError(
      f"cannot train a tokenizer with vocab_size={vocab_size} on {len(lines)} lines of text: "
      f"{reason}"
    ) from None
  paths.write(out_path, model_bytes.getvalue())
  return Tokenizer(out_path)


def load_or_train_tokenizer(
  data_cfg: ml_collections.ConfigDict, vocab_size: int, workdir: str
) -> Tokenizer:
  """Returns the run's tokenizer, kept as workdir/tokenizer.model: given, reused, or trained."""
  dest = paths.join(workdir, workdir_lib.TOKENIZER)
  if data_cfg.tokenizer:
    given = Tokenizer(data_cfg.tokenizer)
    if not paths.exists(dest):
      paths.write(dest, given.proto)
      logging.info("Copied tokenizer %s to %s", data_cfg.tokenizer, dest)
    elif Tokenizer(dest).proto != given.proto:
      raise DataError(
        f"data.tokenizer={data_cfg.tokenizer!r} differs from {dest}, the tokenizer this workdir "
        f"was started with: use a new workdir, or set data.tokenizer={dest!r} or empty"
      )
    return Tokenizer(dest)
  if paths.exists(dest):
    tokenizer = Tokenizer(dest)
    logging.info("Reusing tokenizer %s (vocab %d)", dest, tokenizer.vocab_size)
    return tokenizer
  prepared = sources.pretokenized_tokenizer(data_cfg)
  if prepared:
    paths.write(dest, Tokenizer(prepared).proto)
    logging.info("Using %s, the tokenizer the training data was prepared with", prepared)
    return Tokenizer(dest)
  start = time.perf_counter()
  docs = sources.first_documents(data_cfg, data_cfg.tokenizer_train_docs)
  tokenizer = train_tokenizer(records.texts(docs), vocab_size, dest)
  logging.info(
    "Trained a %d-piece BPE tokenizer on %d documents in %.1f s -> %s",
    tokenizer.vocab_size, len(docs), time.perf_counter() - start, dest,
  )
  return tokenizer

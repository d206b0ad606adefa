"""The sentencepiece backend: published models (LLaMA, Llama 2, Mistral), the ones this project
trains, and their conversion to a Hugging Face tokenizer.json with the same ids."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from nanollama_jax import paths
from nanollama_jax.errors import DataError
from nanollama_jax.data.tokenizer import Tokenizer

MODEL_FILE = "tokenizer.model"  # its name in a Hugging Face model directory and in a workdir
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3  # in the tokenizers this project trains
# The chat format's markers (data/chat.py), reserved in every tokenizer trained here with the ids
# that follow PAD_ID (4 to 9): sentencepiece control symbols, whole pieces that no text encodes to
# (not even the marker strings themselves) and that decode to nothing.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_OF_TURN_ID, THINK_ID, END_THINK_ID = range(
  PAD_ID + 1, PAD_ID + 1 + len(CHAT_TOKENS))
_SPACE = "\u2581"  # sentencepiece's "▁", which stands for a space inside pieces
_NORMAL, _USER_DEFINED = 1, 4  # sentencepiece_model.proto's piece types


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model, from the bytes of its .model file.

  Control symbols (BOS, EOS, Mistral's [INST], our chat markers) are never produced from text
  and decode to nothing; user-defined symbols (Mistral v3's [REFERENCE_DOC_n]) are ordinary
  pieces that the text's own string encodes to, as in sentencepiece itself.
  """

  kind = "sentencepiece"

  def __init__(self, proto: bytes, source: str):
    self._proto, self.source = proto, source
    self._load()

  def _load(self) -> None:
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except RuntimeError as e:
      raise DataError(f"{self.source}: not a sentencepiece model ({e})") from None

  def __getstate__(self) -> dict[str, Any]:
    return {"source": self.source, "proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.source, self._proto = state["source"], state["proto"]
    self._load()

  @property
  def proto(self) -> bytes:
    """The serialized model, as stored in the .model file."""
    return self._proto

  @property
  def files(self) -> dict[str, bytes]:
    return {MODEL_FILE: self._proto}

  @property
  def encoding_bytes(self) -> bytes:
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
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  @property
  def has_pad(self) -> bool:
    """Whether the model has a pad piece of its own (published LLaMA and Mistral ones do not)."""
    return self._sp.pad_id() >= 0

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  @property
  def has_chat_tokens(self) -> bool:
    """Whether CHAT_TOKENS are control symbols at their ids (tokenizers trained before they were
    reserved have ordinary pieces there)."""
    sp = self._sp
    return sp.vocab_size() > END_THINK_ID and all(
      sp.id_to_piece(i) == piece and sp.is_control(i)
      for i, piece in enumerate(CHAT_TOKENS, SYSTEM_ID))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def to_hf(self):
    """A `tokenizers.Tokenizer` whose ids and texts equal this model's; see `convert`."""
    return convert(self)


def check_bos_eos(tokenizer: SentencePieceTokenizer) -> None:
  """Raises DataError for a model without BOS or EOS (documents need both)."""
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise DataError(f"{tokenizer.source}: a sentencepiece model without a BOS or EOS piece "
                    f"(bos_id={tokenizer.bos_id}, eos_id={tokenizer.eos_id}): documents are "
                    "[BOS] + text + [EOS]")


# --- To tokenizer.json --------------------------------------------------------------------------


def _model_proto(tokenizer: SentencePieceTokenizer) -> Any:
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.proto)
  return proto


def check_convertible(tokenizer: SentencePieceTokenizer) -> None:
  """Raises DataError when `convert` cannot reproduce the model's ids exactly."""
  proto = _model_proto(tokenizer)
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  wrong = []
  if spec.model_type != spec.BPE:
    wrong.append(f"model_type={spec.ModelType.Name(spec.model_type)} (only BPE)")
  if norm.name not in ("identity", "") or norm.precompiled_charsmap:
    wrong.append(f"normalization={norm.name!r} (only identity)")
  if norm.remove_extra_whitespaces:
    wrong.append("remove_extra_whitespaces=True")
  if spec.treat_whitespace_as_suffix:
    wrong.append("treat_whitespace_as_suffix=True")
  if wrong:
    raise DataError(f"{tokenizer.source}: a sentencepiece model with {', '.join(wrong)} has no "
                    "exact tokenizer.json equivalent here; export takes BPE models without "
                    "normalization (this project's, LLaMA's, Mistral's)")


def _merges(proto: Any) -> list[tuple[str, str]]:
  """The merges that rebuild each piece, in the order sentencepiece's BPE prefers them.

  Sentencepiece merges, at each step, the adjacent pair whose union is the normal piece with
  the highest score (the leftmost of equal ones). A Hugging Face BPE applies merges by rank, so
  the merges of each piece (every split into two pieces that exist) are ranked by that piece's
  score, highest first; ties by id. Scores are not always in id order: LLaMA's and Mistral's
  "▁▁" and "▁▁▁▁" (ids 259 and 260) score -1e9 and are merged last.
  """
  pieces = [p.piece for p in proto.pieces]
  normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
  ranked = sorted((-proto.pieces[i].score, i) for i in normal.values())
  merges = []
  for _, i in ranked:
    piece = pieces[i]
    splits = sorted((normal[piece[:k]], normal[piece[k:]]) for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    merges += [(pieces[a], pieces[b]) for a, b in splits]
  return merges


def convert(tokenizer: SentencePieceTokenizer):
  """A `tokenizers.Tokenizer` with this model's ids (tokenizer.json for transformers).

  - normalizer: spaces become "▁"; with add_dummy_prefix (LLaMA, Mistral), "▁" is put first.
  - pre-tokenizer: sentencepiece's word split: a word starts at the text's start and at a "▁"
    that follows anything but "▁" (a run of spaces stays with the word after it; with
    allow_whitespace_only_pieces off, at every "▁").
  - model: BPE over the model's pieces, merges ranked by piece score (`_merges`), byte fallback
    as in the model, unknown characters to <unk>.
  - control symbols (BOS, EOS, [INST] ...) are special tokens; user-defined symbols ordinary
    added tokens; the post-processor puts BOS first, as LLaMA's tokenizers do.
  - decoder: "▁" back to spaces, bytes back to characters, the dummy prefix's space removed.
  """
  from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
  from tokenizers import processors  # pylint: disable=import-outside-toplevel

  check_convertible(tokenizer)
  proto = _model_proto(tokenizer)
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  hf = HFTokenizer(models.BPE(vocab=vocab, merges=_merges(proto), byte_fallback=spec.byte_fallback,
                              unk_token=tokenizer.piece(tokenizer.unk_id), fuse_unk=True))
  steps = [normalizers.Replace(" ", _SPACE)]
  if norm.add_dummy_prefix:
    steps.insert(0, normalizers.Prepend(_SPACE))
  hf.normalizer = normalizers.Sequence(steps)
  if spec.split_by_whitespace and spec.allow_whitespace_only_pieces:
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+"), "isolated")
  elif spec.split_by_whitespace:
    hf.pre_tokenizer = pre_tokenizers.Split(_SPACE, "merged_with_next")
  chain = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if norm.add_dummy_prefix:
    chain.append(decoders.Strip(" ", 1, 0))
  hf.decoder = decoders.Sequence(chain)
  sp = tokenizer._sp  # pylint: disable=protected-access
  hf.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                         for i in range(sp.get_piece_size()) if sp.is_control(i)])
  hf.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                 for p in proto.pieces if p.type == _USER_DEFINED])
  bos = sp.id_to_piece(tokenizer.bos_id)
  hf.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
  return hf


# --- Training ------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> SentencePieceTokenizer:
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
  return SentencePieceTokenizer(model_bytes.getvalue(), out_path)


"""The one tokenizer interface that the pipeline, chat, sampling, the harness, export and the
scripts use, over two backends:

  data/spm_tokenizer.py   sentencepiece models: the ones this project trains, LLaMA's, Llama 2's
                          and Mistral's (`tokenizer.model`)
  data/hf_tokenizer.py    Hugging Face `tokenizer.json` files (Llama 3's byte-level BPE, and any
                          other), through the `tokenizers` library

Where a run's tokenizer comes from (a path, a directory, `hf:ORG/NAME`, the workdir's copy, or
trained on the corpus) is data/tokenizer_source.py.

What both backends promise:
- A document is [BOS] + encode(text) + [EOS], with the tokenizer's own BOS and EOS.
- encode() turns text into ordinary tokens only: a special token's string inside a text
  (`<|eot_id|>`, `[INST]`, `</s>`) is encoded as text, never as that token. (transformers'
  `tokenizer(text)` matches them by default; `split_special_tokens=True` gives our ids.)
- pad_id is always a valid id: the tokenizer's pad token, or its EOS when it has none (no
  published LLaMA, Mistral or Llama 3 tokenizer has one). Padding is never trained on (loss mask
  0) nor attended to (segment id 0), and is exported as `pad_token_id`.
- vocab_size is the largest id + 1: the rows of the embedding that the tokenizer can reach.
- Instances pickle as the bytes of their files, so grain workers rebuild them without reading
  the files again.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence


class Tokenizer(abc.ABC):
  """Text to token ids and back; see the module docstring for what every backend promises."""

  kind: str  # "sentencepiece" or "tokenizer.json"
  source: str  # where it was read from (a path, a directory or an hf: name), for messages

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """The largest id + 1."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """The id each document starts with."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """The id each document ends with."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """The id of padding: the tokenizer's pad token, else EOS; never trained on."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The token ids of `text`, without BOS or EOS; special-token strings in it are text."""

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode() of each text, in one call into the backend."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; BOS, EOS, padding and other special tokens decode to nothing."""

  @property
  @abc.abstractmethod
  def files(self) -> dict[str, bytes]:
    """The tokenizer's files, by the names a Hugging Face model directory gives them."""

  @property
  @abc.abstractmethod
  def encoding_bytes(self) -> bytes:
    """The bytes that decide encode()'s ids (the model file), hashed by `fingerprint`."""

  @property
  def fingerprint(self) -> str:
    """The SHA-256 of `encoding_bytes`: ids written by two tokenizers with the same fingerprint
    are interchangeable (pretokenized datasets record it)."""
    return hashlib.sha256(self.encoding_bytes).hexdigest()

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template of the tokenizer's configuration, if it has one."""
    return None

  @property
  def has_chat_tokens(self) -> bool:
    """Whether it reserves this project's chat markers (tokenizers trained here do)."""
    return False

  def describe(self) -> str:
    """One line for logs and messages: kind, source and size."""
    return f"{self.kind} tokenizer {self.source} ({self.vocab_size:,} ids)"

  def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text that `new_ids` add after `prompt_ids`.

    Decoding `new_ids` alone can lose text at the seam: a sentencepiece model with a dummy
    prefix drops the leading space of whatever it decodes first. The whole is decoded and the
    prompt's own text cut off instead.
    """
    prompt, whole = self.decode(prompt_ids), self.decode([*prompt_ids, *new_ids])
    return whole[len(prompt):] if whole.startswith(prompt) else self.decode(new_ids)

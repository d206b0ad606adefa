"""The Hugging Face backend: a `tokenizer.json` (Llama 3's byte-level BPE, or any other) read with
the `tokenizers` library, with the `tokenizer_config.json` and `special_tokens_map.json` beside it
for its BOS, EOS, pad token and chat template, as transformers reads them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from nanollama_jax import paths
from nanollama_jax.errors import DataError
from nanollama_jax.data.tokenizer import Tokenizer

TOKENIZER_JSON = "tokenizer.json"
CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 may keep the chat template
FILES = (TOKENIZER_JSON, CONFIG, SPECIAL_TOKENS_MAP, TEMPLATE_FILE)
# The special-token roles a configuration can name, as chat templates see them.
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Llama 3's pre-tokenizer pattern (its tokenizer.json): contractions, letters with one leading
# non-letter, numbers of up to 3 digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _content(value: Any) -> str | None:
  """A token as configurations write it: a string, or {"content": ...} (an AddedToken)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
  """A tokenizer.json and its configuration, from the bytes of their files (`FILES` by name).

  BOS, EOS and the pad token are the ones tokenizer_config.json (or special_tokens_map.json)
  names; a tokenizer without a BOS token (GPT-2's, Qwen's) starts documents with its EOS token,
  the document separator those models were trained with.
  """

  kind = "tokenizer.json"

  def __init__(self, files: dict[str, bytes], source: str):
    self._files = {name: files[name] for name in FILES if name in files}
    self.source = source
    self._load()

  def _load(self) -> None:
    from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=import-outside-toplevel

    try:
      self._text = RustTokenizer.from_str(self._files[TOKENIZER_JSON].decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  # a missing file, bad UTF-8, or the Rust parser's own errors
      raise DataError(f"{self.source}: not a Hugging Face tokenizer.json "
                      f"({' '.join(str(e).split())[:200]})") from None
    self._text.encode_special_tokens = True  # special-token strings in text are text
    self._markup = None  # the same tokenizer matching special tokens, for chat templates
    self._config = {}
    for name in (SPECIAL_TOKENS_MAP, CONFIG):  # the configuration wins, as in transformers
      if name in self._files:
        try:
          self._config.update(json.loads(self._files[name]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise DataError(f"{self.source}: {name} is not JSON ({e})") from None
    self.tokens = {role: _content(self._config.get(role)) for role in ROLES}
    self._ids = {role: self._id_of(role) for role in ROLES}
    if self._ids["eos_token"] is None:
      raise DataError(f"{self.source}: no EOS token (eos_token in {CONFIG} or "
                      f"{SPECIAL_TOKENS_MAP}, naming a token of {TOKENIZER_JSON}): documents end "
                      "with one")
    vocab = self._text.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1

  def _id_of(self, role: str) -> int | None:
    token = self.tokens[role]
    if token is None:
      return None
    i = self._text.token_to_id(token)
    if i is None:
      raise DataError(f"{self.source}: {role}={token!r} is not a token of {TOKENIZER_JSON}")
    return i

  def __getstate__(self) -> dict[str, Any]:
    return {"source": self.source, "files": self._files}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.source, self._files = state["source"], state["files"]
    self._load()

  @property
  def files(self) -> dict[str, bytes]:
    return dict(self._files)

  @property
  def encoding_bytes(self) -> bytes:
    return self._files[TOKENIZER_JSON]

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    bos = self._ids["bos_token"]
    return self.eos_id if bos is None else bos

  @property
  def eos_id(self) -> int:
    return self._ids["eos_token"]

  @property
  def pad_id(self) -> int:
    pad = self._ids["pad_token"]
    return self.eos_id if pad is None else pad

  def token_id(self, token: str) -> int | None:
    return self._text.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return self._text.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # The fast variant computes no character offsets (a third faster on the sample's stories).
    return [e.ids for e in self._text.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._text.decode([int(i) for i in ids], skip_special_tokens=True)

  # --- Chat templates ---------------------------------------------------------------------------

  @property
  def chat_template(self) -> str | None:
    template = self._config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}]; "default" is used
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and TEMPLATE_FILE in self._files:
      template = self._files[TEMPLATE_FILE].decode("utf-8")
    return template or None

  def template_variables(self) -> dict[str, str]:
    """The special tokens a chat template may refer to (bos_token, eos_token ...), by role."""
    return {role: token for role, token in self.tokens.items() if token is not None}

  def control_tokens(self, template: str) -> list[str]:
    """The added tokens that a chat template writes as tokens: the special ones, and any other
    that the template's text contains."""
    added = self._text.get_added_tokens_decoder().values()
    return [t.content for t in added
            if t.special or (t.content in template and not t.content.isspace())]

  def encode_markup(self, text: str, as_text: bool = False) -> tuple[list[int], list[int]]:
    """(ids, each token's start in `text`) of rendered chat markup: special tokens written in it
    become those tokens, unless `as_text`."""
    if as_text:
      encoding = self._text.encode(text, add_special_tokens=False)
    else:
      if self._markup is None:
        from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=import-outside-toplevel
        self._markup = RustTokenizer.from_str(self._files[TOKENIZER_JSON].decode("utf-8"))
      encoding = self._markup.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_dir: str,
                         special_tokens: Sequence[str] = ("<|begin_of_text|>", "<|end_of_text|>"),
                         bos: str = "<|begin_of_text|>", eos: str = "<|end_of_text|>",
                         chat_template: str | None = None) -> HFTokenizer:
  """Trains a byte-level BPE in Llama 3's style (its pre-tokenizer pattern, special tokens after
  the learnt vocabulary, BOS put first by the post-processor) and writes tokenizer.json and
  tokenizer_config.json to `out_dir`: a small stand-in for Llama 3's tokenizer (the tests' and
  the benchmark's), or a tokenizer.json of your own."""
  from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=import-outside-toplevel

  tok = RustTokenizer(models.BPE(ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special_tokens), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.add_special_tokens(list(special_tokens))
  tok.post_processor = processors.Sequence([
    processors.ByteLevel(trim_offsets=False),
    processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                  special_tokens=[(bos, tok.token_to_id(bos))])])
  config = {"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False}
  if chat_template:
    config["chat_template"] = chat_template
  files = {TOKENIZER_JSON: tok.to_str().encode("utf-8"),
           CONFIG: json.dumps(config, indent=2).encode("utf-8")}
  for name, blob in files.items():
    paths.write(paths.join(out_dir, name), blob)
  return HFTokenizer(files, out_dir)

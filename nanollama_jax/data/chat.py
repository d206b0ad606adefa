"""Conversations as token ids: a mask of the tokens the assistant writes (the ones a chat run
trains on), the prompt that asks for the assistant's reply, and where a generated reply stops.

`formatter(tokenizer)` picks one of two formats:

- `Markers`, for a tokenizer trained here (it reserves the markers, spm_tokenizer.CHAT_TOKENS):

    [BOS] <|system|> text <|end|>  <|user|> text <|end|>  <|assistant|> <think> reasoning </think>
    text <|end|>  ...  [EOS]

  Every turn is its role's marker, its text and <|end|>; an assistant turn with reasoning puts
  it between <think> and </think> before its text. The assistant writes everything after its
  marker up to and including its <|end|>. Each text is encoded on its own, so no piece spans a
  marker. `TEMPLATE` is the same format as a Jinja chat template, for the export.

- `Template`, for a tokenizer.json whose configuration has a chat template (Llama 3's, Mistral's
  instruct models', ...): each conversation is rendered by the template as transformers'
  `apply_chat_template` renders it (the same Jinja sandbox, globals and filters, the special
  tokens as variables) and tokenized with the special tokens the template writes matched. The
  ids equal `apply_chat_template(messages, sanitize_control_tokens=True)`: a special token's
  string inside a message is text, as in every document (without control-token strings in the
  messages, that is also the default `apply_chat_template(messages)`). The assistant's tokens
  are found by rendering the conversation up to each assistant turn with and without it: what
  the turn adds to the rendered text (normally its content and the template's end of turn,
  e.g. Llama 3's `<|eot_id|>`) is trained. A template that renders earlier turns differently
  once later ones follow is refused. Reasoning goes into `reasoning_content` when the template
  reads it (Qwen3's and DeepSeek's do), else it is written at the start of the content as text,
  `<think>\\n...\\n</think>\\n\\n`, the form reasoning models distilled into Llama write.

A tokenizer with neither is refused with both ways out.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanollama_jax.errors import DataError
from nanollama_jax.data import records
from nanollama_jax.data.hf_tokenizer import HFTokenizer
from nanollama_jax.data.spm_tokenizer import (ASSISTANT_ID, BOS_ID, CHAT_TOKENS, END_OF_TURN_ID,
                                              END_THINK_ID, EOS_ID, SYSTEM_ID, THINK_ID, USER_ID)
from nanollama_jax.data.tokenizer import Tokenizer

Encoded = tuple[np.ndarray, np.ndarray]  # ids (int32), trained-token mask (uint8)
THINK, END_THINK = "<think>", "</think>"


class Markers:
  """This project's chat format (see the module docstring), for tokenizers trained here."""

  ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
  stop_ids = (END_OF_TURN_ID, EOS_ID)  # a generated reply ends with its turn (or the document)

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def encode(self, conversation: records.Conversation, add_generation_prompt: bool = False
             ) -> Encoded:
    """The ids of a conversation and its mask of trained tokens; with `add_generation_prompt`,
    it ends with <|assistant|> instead of EOS: the prompt for the assistant's next turn."""
    encoded = iter(self.tokenizer.encode_batch(records.texts([conversation])))
    ids, trained = [BOS_ID], [0]
    for message in conversation:
      turn = []
      if message.reasoning:
        turn += [THINK_ID, *next(encoded), END_THINK_ID]
      turn += [*next(encoded), END_OF_TURN_ID]
      ids += [self.ROLE_IDS[message.role], *turn]
      trained += [0] + [int(message.role == "assistant")] * len(turn)
    ids.append(ASSISTANT_ID if add_generation_prompt else EOS_ID)
    trained.append(0)
    return np.array(ids, np.int32), np.array(trained, np.uint8)

  def split_reply(self, ids: Sequence[int]) -> tuple[str, str]:
    """(reasoning, text) of a generated reply: the ids after <|assistant|>, before <|end|>."""
    ids = list(ids)
    if not ids or ids[0] != THINK_ID:
      return "", self.tokenizer.decode(ids)
    end = ids.index(END_THINK_ID) if END_THINK_ID in ids else len(ids)
    return self.tokenizer.decode(ids[1:end]), self.tokenizer.decode(ids[end + 1:])

  def prompt(self, user: str, system: str = "") -> list[int]:
    """The ids that ask for the assistant's reply to `user` (after a system turn if given)."""
    return _prompt(self, user, system)


def _prompt(fmt: Markers | Template, user: str, system: str) -> list[int]:
  turns = [records.Message("system", system)] if system else []
  ids, _ = fmt.encode((*turns, records.Message("user", user)), add_generation_prompt=True)
  return ids.tolist()


def _markers_template() -> str:
  """`Markers` as a transformers chat template (Jinja), rendered to text that the exported
  tokenizer splits at the markers (special tokens) and encodes piece by piece."""
  system, user, assistant, end, think, end_think = CHAT_TOKENS
  reasoning = "message['" + records.REASONING_KEY + "']"
  return (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + system +
    "{% elif message['role'] == 'user' %}" + user +
    "{% elif message['role'] == 'assistant' %}" + assistant +
    "{% if " + reasoning + " %}" + think + "{{ " + reasoning + " }}" + end_think + "{% endif %}"
    "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ '; allowed: "
    + ", ".join(records.ROLES) + "') }}"
    "{% endif %}{{ message['content'] }}" + end + "{% endfor %}"
    "{% if add_generation_prompt %}" + assistant + "{% else %}{{ eos_token }}{% endif %}"
  )


TEMPLATE = _markers_template()

# --- Chat templates -------------------------------------------------------------------------------

# Private-use characters around a control token's string inside a message, so that it can be
# told from the tokens the template writes (and encoded as text).
_MARK, _END_MARK = "\ue000", "\ue001"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names templates read it by


def _environment():
  """A Jinja environment like the one transformers renders chat templates in."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, nodes  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text),
    rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class Template:
  """A tokenizer's own chat template (see the module docstring)."""

  def __init__(self, tokenizer: HFTokenizer, template: str):
    self.tokenizer, self.template = tokenizer, template
    self._reads_reasoning = any(field in template for field in _REASONING_FIELDS)
    controls = sorted(tokenizer.control_tokens(template), key=len, reverse=True)
    self._controls = re.compile("|".join(map(re.escape, controls)) or "(?!)")
    self._marked = re.compile(f"{_MARK}({self._controls.pattern}){_END_MARK}|[{_MARK}{_END_MARK}]")
    self._compiled = None
    self._newline = tokenizer.encode_markup("\n")[0]
    self.stop_ids = self._stop_ids()

  def __getstate__(self) -> dict[str, Any]:
    return {"tokenizer": self.tokenizer, "template": self.template}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["tokenizer"], state["template"])

  def _mark(self, text: str) -> str:
    text = text.replace(_MARK, "").replace(_END_MARK, "")
    return self._controls.sub(lambda m: f"{_MARK}{m.group(0)}{_END_MARK}", text)

  def _messages(self, conversation: records.Conversation) -> list[dict[str, str]]:
    out = []
    for m in conversation:
      message = {"role": m.role, "content": self._mark(m.content)}
      if m.reasoning and self._reads_reasoning:
        reasoning = self._mark(m.reasoning)
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
      elif m.reasoning:
        message["content"] = f"{THINK}\n{self._mark(m.reasoning)}\n{END_THINK}\n\n" + message[
          "content"]
      out.append(message)
    return out

  def render(self, conversation: records.Conversation, add_generation_prompt: bool = False
             ) -> str:
    """The template's text of a conversation, control tokens in messages marked."""
    import jinja2  # pylint: disable=import-outside-toplevel
    if self._compiled is None:
      self._compiled = _environment().from_string(self.template)
    try:
      return self._compiled.render(messages=self._messages(conversation), tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **self.tokenizer.template_variables())
    except jinja2.TemplateError as e:
      raise DataError(f"the chat template of {self.tokenizer.source} failed on a conversation "
                      f"({type(e).__name__}: {e})") from None

  def tokenize(self, rendered: str) -> tuple[list[int], list[int]]:
    """(ids, each token's start in `rendered`) of a rendered conversation: marked control tokens
    as text, the template's own as tokens. Pieces after a marker are encoded after a newline
    that is then dropped (as transformers does), so a sentencepiece-style tokenizer adds no
    prefix space there."""
    ids, starts, start = [], [], 0
    pieces = []
    for m in self._marked.finditer(rendered):
      pieces.append((start, rendered[start:m.start()], False))
      if m.group(1) is not None:
        pieces.append((m.start(1), m.group(1), True))
      start = m.end()
    pieces.append((start, rendered[start:], False))
    for n, (at, piece, as_text) in enumerate(pieces):
      if not piece:
        continue
      if n == 0:
        piece_ids, piece_starts = self.tokenizer.encode_markup(piece, as_text)
      else:
        piece_ids, piece_starts = self.tokenizer.encode_markup("\n" + piece, as_text)
        skip = len(self._newline)
        if piece_ids[:skip] == self._newline:
          piece_ids, piece_starts = piece_ids[skip:], [s - 1 for s in piece_starts[skip:]]
        else:
          piece_ids, piece_starts = self.tokenizer.encode_markup(piece, as_text)
      ids += piece_ids
      starts += [at + s for s in piece_starts]
    return ids, starts

  def encode(self, conversation: records.Conversation, add_generation_prompt: bool = False
             ) -> Encoded:
    """The ids of a conversation and its mask of trained tokens (what each assistant turn adds
    to the rendered text); with `add_generation_prompt`, the prompt for the next reply."""
    whole = self.render(conversation, add_generation_prompt)
    spans = []
    for i, message in enumerate(conversation):
      if message.role != "assistant":
        continue
      before = self.render(conversation[:i], add_generation_prompt=True)
      through = self.render(conversation[:i + 1])
      if not whole.startswith(through):
        raise DataError(
          f"the chat template of {self.tokenizer.source} renders turn {i + 1} differently once "
          "later turns follow it (it drops or rewrites earlier turns), so the tokens the "
          "assistant writes cannot be told apart; train on conversations that end at such a "
          "turn, or use another template")
      common = next((k for k, (a, b) in enumerate(zip(before, through)) if a != b),
                    min(len(before), len(through)))
      spans.append((common, len(through)))
    ids, starts = self.tokenize(whole)
    trained = np.zeros(len(ids), np.uint8)
    for begin, end in spans:
      trained[[begin <= s < end for s in starts]] = 1
    return np.array(ids, np.int32), trained

  def _stop_ids(self) -> tuple[int, ...]:
    """EOS and the special tokens that end an assistant's turn in this template (Llama 3's
    <|eot_id|>), read off a rendered turn: what follows the reply's text."""
    probe = (records.Message("user", "Hi"), records.Message("assistant", "Hello"))
    ids, trained = self.encode(probe)
    reply = [i for i, t in zip(ids.tolist(), trained.tolist()) if t]
    special = [self.tokenizer.decode([i]) == "" for i in reply]  # special tokens decode to ""
    last_text = max((k for k, s in enumerate(special) if not s), default=-1)
    ends = [i for i, s in zip(reply[last_text + 1:], special[last_text + 1:]) if s]
    return tuple(dict.fromkeys([*ends[:1], self.tokenizer.eos_id]))

  def split_reply(self, ids: Sequence[int]) -> tuple[str, str]:
    """(reasoning, text) of a generated reply: a leading <think> ... </think> is reasoning."""
    text = self.tokenizer.decode(ids)
    head = text.lstrip()
    if not head.startswith(THINK):
      return "", text
    inner, sep, rest = head[len(THINK):].partition(END_THINK)
    return inner.strip("\n"), rest.lstrip("\n") if sep else ""

  def prompt(self, user: str, system: str = "") -> list[int]:
    """The ids that ask for the assistant's reply to `user` (after a system turn if given)."""
    return _prompt(self, user, system)


def formatter(tokenizer: Tokenizer) -> Markers | Template:
  """The chat format of `tokenizer`: its chat template if it has one, else this project's
  markers if it reserves them; a DataError that names both ways out otherwise."""
  template = tokenizer.chat_template
  if template and isinstance(tokenizer, HFTokenizer):
    return Template(tokenizer, template)
  if tokenizer.has_chat_tokens:
    return Markers(tokenizer)
  has = (f"a chat template, but chat templates are rendered with tokenizer.json tokenizers and "
         f"this is a {tokenizer.kind} one" if template else "no chat template")
  raise DataError(
    f"{tokenizer.describe()} has {has} and not this project's chat tokens "
    f"({' '.join(CHAT_TOKENS)}): data.format='chat' needs one or the other. Use a tokenizer "
    "whose tokenizer_config.json has a chat_template (an instruct model's directory or "
    "hf:ORG/NAME, e.g. hf:meta-llama/Llama-3.2-1B-Instruct), or pretrain with a tokenizer "
    "trained here (data.tokenizer empty, or scripts/train_tokenizer.py), which reserves them")

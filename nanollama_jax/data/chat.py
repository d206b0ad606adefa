"""The chat format: a conversation as one document of token ids with a mask of the tokens the
assistant writes, the prompt that asks for the assistant's reply, and the same format as a Jinja
chat template for transformers.

  [BOS] <|system|> text <|end|>  <|user|> text <|end|>  <|assistant|> <think> reasoning </think>
  text <|end|>  ...  [EOS]

Every turn is its role's marker, its text and <|end|>; an assistant turn with reasoning puts it
between <think> and </think> before its text. The assistant writes everything after its marker up
to and including its <|end|>: those tokens are trained (mask 1). BOS, EOS, the system and user
turns and the assistant's marker are context (mask 0). Each text is encoded on its own, so no
piece spans a marker. The markers are control symbols (tokenizer.CHAT_TOKENS): no text, not even
a marker's own string, encodes to them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from nanollama_jax.data import records
from nanollama_jax.data.tokenizer import (ASSISTANT_ID, BOS_ID, CHAT_TOKENS, END_OF_TURN_ID,
                                          END_THINK_ID, EOS_ID, SYSTEM_ID, THINK_ID, USER_ID,
                                          Tokenizer)

ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
STOP_IDS = (END_OF_TURN_ID, EOS_ID)  # a generated reply ends with its turn (or the document)


def assemble(conversation: records.Conversation, encoded: Iterator[Sequence[int]],
             add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The ids of a conversation (int32) and its mask of trained tokens (uint8), from the ids of
  `records.texts([conversation])` in order.

  With `add_generation_prompt`, the conversation ends with <|assistant|> instead of EOS: the
  prompt for the assistant's next turn.
  """
  ids, trained = [BOS_ID], [0]
  for message in conversation:
    turn = []
    if message.reasoning:
      turn += [THINK_ID, *next(encoded), END_THINK_ID]
    turn += [*next(encoded), END_OF_TURN_ID]
    ids += [ROLE_IDS[message.role], *turn]
    trained += [0] + [int(message.role == "assistant")] * len(turn)
  ids.append(ASSISTANT_ID if add_generation_prompt else EOS_ID)
  trained.append(0)
  return np.array(ids, np.int32), np.array(trained, np.uint8)


def encode(tokenizer: Tokenizer, conversation: records.Conversation,
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A conversation's ids and trained-token mask; see `assemble`."""
  tokenizer.require_chat_tokens()
  encoded = iter(tokenizer.encode_batch(records.texts([conversation])))
  return assemble(conversation, encoded, add_generation_prompt)


def prompt(tokenizer: Tokenizer, user: str, system: str = "") -> list[int]:
  """The ids that ask for the assistant's reply to `user` (after a system turn if given)."""
  turns = [records.Message("system", system)] if system else []
  ids, _ = encode(tokenizer, (*turns, records.Message("user", user)), add_generation_prompt=True)
  return ids.tolist()


def split_reply(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[str, str]:
  """(reasoning, text) of a generated reply: the ids after <|assistant|>, before <|end|>."""
  ids = list(ids)
  if not ids or ids[0] != THINK_ID:
    return "", tokenizer.decode(ids)
  end = ids.index(END_THINK_ID) if END_THINK_ID in ids else len(ids)
  return tokenizer.decode(ids[1:end]), tokenizer.decode(ids[end + 1:])


def _template() -> str:
  """The format as a transformers chat template (Jinja), rendered to text that the exported
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


TEMPLATE = _template()

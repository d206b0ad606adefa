"""Writes the chat sample (nanollama_jax/data/chat_sample/) from the TinyStories sample.

  python scripts/make_chat_sample.py [--out nanollama_jax/data/chat_sample] [--json]

Deterministic: the same TinyStories sample gives the same bytes. Each of the first short stories
(at most --max-chars characters) becomes one conversation in which the user asks for a story,
either one that begins with the story's first sentence or one about its main character ("a
little girl named Lily"), and the assistant answers with the story. By the story's index i:
every third conversation opens with a system turn, every fourth answer (i % 4 == 1) carries a
short reasoning span, and every fifth conversation with a named character (i % 5 == 2) goes on
with "Who is the story about?" and its answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from nanollama_jax import data, errors
from nanollama_jax.data import records

SYSTEMS = ("You are a storyteller for young children.",
           "You write short stories with simple words for small children.")
_CHARACTER = re.compile(r"\b(?:a|an) (?:[a-z]+ ){0,3}?named ([A-Z][a-z]+)")
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)


def _paragraphs(story: str) -> str:
  n = story.count("\n") + 1
  return f"{n} paragraph{'s' if n > 1 else ''}"


def conversation(i: int, story: str) -> list[dict[str, str]]:
  """The conversation made of story number `i`: a request, the story, maybe a follow-up."""
  character = _CHARACTER.search(story)
  first = _SENTENCE.match(story)
  messages = [{"role": "system", "content": SYSTEMS[i // 3 % 2]}] if i % 3 == 0 else []
  if character and (i % 2 or first is None):
    ask = f"Tell me a short story about {character.group(0)}."
    why = f"The story is about {character.group(1)}. I will use simple words and tell it in "
  else:
    ask = f"Write a story that begins with: {first.group(1) if first else story[:60]}"
    why = "I have to start with the sentence I was given and go on from there, in "
  answer = {"role": "assistant", "content": story}
  if i % 4 == 1:
    answer[records.REASONING_KEY] = why + _paragraphs(story) + "."
  messages += [{"role": "user", "content": ask}, answer]
  if character and i % 5 == 2:
    messages += [{"role": "user", "content": "Who is the story about?"},
                 {"role": "assistant", "content": f"It is about {character.group(0)}."}]
  return messages


def write_split(src: str, out: str, count: int, max_chars: int) -> dict[str, int]:
  """Writes `count` conversations made of the short stories of `src`; returns counts."""
  stories = [s for s in records.read_files([src], "text") if len(s) <= max_chars][:count]
  if len(stories) < count:
    raise errors.DataError(f"{src}: only {len(stories)} stories of at most {max_chars} characters")
  convs = [conversation(i, story) for i, story in enumerate(stories)]
  with open(out, "w", encoding="utf-8") as f:
    for messages in convs:
      f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
  return {"conversations": len(convs), "bytes": os.path.getsize(out),
          "system": sum(m[0]["role"] == "system" for m in convs),
          "reasoning": sum(records.REASONING_KEY in m for c in convs for m in c),
          "multi_turn": sum(sum(m["role"] == "assistant" for m in c) > 1 for c in convs)}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default=os.path.join(os.path.dirname(data.__file__), "chat_sample"))
  p.add_argument("--train", type=int, default=360, help="conversations in train.jsonl")
  p.add_argument("--validation", type=int, default=50, help="conversations in validation.jsonl")
  p.add_argument("--max-chars", type=int, default=700, help="the longest story used")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  summary = {split: write_split(str(data.sample_dir() / f"{split}.jsonl"),
                                os.path.join(args.out, f"{split}.jsonl"), n, args.max_chars)
             for split, n in (("train", args.train), ("validation", args.validation))}
  if args.json:
    print(json.dumps(summary))
    return
  for split, counts in summary.items():
    print(f"{args.out}/{split}.jsonl: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))


if __name__ == "__main__":
  errors.cli(main)

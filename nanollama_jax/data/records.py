"""Documents and the records they are read from: the checks every source shares, and the
readers of local JSON lines, text and Parquet files.

A document is a text (`data.format="text"`: the field `data.text_key`) or a conversation
(`data.format="chat"`: the field "messages", a list of {"role", "content"} turns with roles system,
user and assistant, an assistant turn optionally with "reasoning_content"), read as a tuple of
`Message`s.

Bad records never reach a worker: empty documents (and conversations), conversations without an
assistant turn and lines that are not valid UTF-8 are skipped and counted (in the `skipped`
counter a reader is given, which sources.py logs); a record without the field, a line that is
not JSON, a turn with an unknown role, or a missing or non-string content or reasoning in
another turn than the assistant's is an error that names the file, the line and the key.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from nanollama_jax.errors import DataError

JSON_EXTENSIONS = (".jsonl", ".json")
TEXT_EXTENSIONS = (".txt",)
PARQUET_EXTENSIONS = (".parquet",)
EXTENSIONS = JSON_EXTENSIONS + TEXT_EXTENSIONS + PARQUET_EXTENSIONS
EMPTY, BAD_UTF8 = "empty documents", "lines that are not UTF-8"
NO_ASSISTANT = "conversations without an assistant turn"
MESSAGES_KEY, REASONING_KEY = "messages", "reasoning_content"  # the chat format's record fields
ROLES = ("system", "user", "assistant")


class Message(NamedTuple):
  """One turn of a conversation; only an assistant turn has reasoning ('' for none)."""
  role: str
  content: str
  reasoning: str = ""


Conversation = tuple[Message, ...]
Document = str | Conversation


def record_field(text_key: str, doc_format: str) -> tuple[str, str]:
  """The record field that holds a document, and the config that names it."""
  if doc_format == "chat":
    return MESSAGES_KEY, "data.format='chat'"
  return text_key, "data.text_key"


def field_named(text_key: str, doc_format: str) -> str:
  """How errors name the field: "data.text_key='text'" or "'messages' (data.format='chat')"."""
  field, named_by = record_field(text_key, doc_format)
  return f"{named_by}={field!r}" if doc_format == "text" else f"{field!r} ({named_by})"


def _text_or_skip(text: Any, where: str, text_key: str, skipped: collections.Counter) -> str | None:
  if text is None or (isinstance(text, str) and not text.strip()):
    skipped[EMPTY] += 1
    return None
  if not isinstance(text, str):
    raise DataError(f"{where}: field {text_key!r} is a {type(text).__name__}, not a string")
  return text


def _message(turn: Any, where: str) -> Message:
  if not isinstance(turn, dict):
    raise DataError(f"{where}: a {type(turn).__name__}, not an object with 'role' and 'content'")
  role, content, reasoning = turn.get("role"), turn.get("content"), turn.get(REASONING_KEY)
  if role not in ROLES:
    raise DataError(f"{where}: role {role!r}; allowed: {', '.join(ROLES)}")
  if not isinstance(content, str):
    what = "missing" if content is None else f"a {type(content).__name__}, not a string"
    raise DataError(f"{where}: 'content' is {what}")
  if reasoning is not None and not (role == "assistant" and isinstance(reasoning, str)):
    raise DataError(f"{where}: {REASONING_KEY!r} ({type(reasoning).__name__}) in a turn of the "
                    f"{role}; it must be a string in an assistant turn")
  return Message(role, content, reasoning or "")


def conversation_or_skip(messages: Any, where: str,
                          skipped: collections.Counter) -> Conversation | None:
  """A record's "messages" as a conversation; None (counted in `skipped`) if it has no turn or no
  assistant turn."""
  if messages is None or (isinstance(messages, list) and not messages):
    skipped[EMPTY] += 1
    return None
  if not isinstance(messages, list):
    raise DataError(f"{where}: field {MESSAGES_KEY!r} is a {type(messages).__name__}, not a list "
                    "of messages")
  conversation = tuple(_message(turn, f"{where}, message {i}")
                       for i, turn in enumerate(messages, 1))
  if all(m.role != "assistant" for m in conversation):
    skipped[NO_ASSISTANT] += 1
    return None
  return conversation


def document_or_skip(value: Any, where: str, field: str, doc_format: str,
                      skipped: collections.Counter) -> Document | None:
  """A record's field as a document of `doc_format`; None (counted in `skipped`) if empty."""
  if doc_format == "chat":
    return conversation_or_skip(value, where, skipped)
  return _text_or_skip(value, where, field, skipped)


def texts(docs: Iterable[Document]) -> list[str]:
  """The texts of documents: each text, and each turn's reasoning (if any) then its content."""
  out = []
  for doc in docs:
    if isinstance(doc, str):
      out.append(doc)
      continue
    for message in doc:
      out += [message.reasoning, message.content] if message.reasoning else [message.content]
  return out


def _decode(raw: bytes, skipped: collections.Counter) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    skipped[BAD_UTF8] += 1
    return None


def _json_lines(path: str, text_key: str, doc_format: str,
                skipped: collections.Counter) -> Iterator[Document]:
  field, named_by = record_field(text_key, doc_format)
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      line = _decode(raw, skipped)
      if line is None or not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
          f"{path}, line {number}: no field {field!r} ({named_by}); the record has {keys}")
      doc = document_or_skip(record[field], f"{path}, line {number}", field, doc_format, skipped)
      if doc is not None:
        yield doc


def _text_lines(path: str, separator: str, skipped: collections.Counter) -> Iterator[str]:
  if not separator:  # one document per line; blank lines only separate
    with open(path, "rb") as f:
      for raw in f:
        line = _decode(raw.rstrip(b"\r\n"), skipped)
        if line and line.strip():
          yield line
    return
  with open(path, "rb") as f:
    pieces = f.read().split(separator.encode("utf-8"))
  for i, raw in enumerate(pieces):
    text = _decode(raw.strip(), skipped)
    if text:
      yield text
    elif text is not None and 0 < i < len(pieces) - 1:  # not before the first or after the last
      skipped[EMPTY] += 1


def _parquet(path: str, text_key: str, doc_format: str,
             skipped: collections.Counter) -> Iterator[Document]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  field, named_by = record_field(text_key, doc_format)
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file that is not Parquet
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  columns = table.schema_arrow.names
  if field not in columns:
    raise DataError(f"{path}: no column {field!r} ({named_by}); columns: {', '.join(columns)}")
  row = 0
  for batch in table.iter_batches(columns=[field], batch_size=4096):
    for value in batch.column(0).to_pylist():
      row += 1
      doc = document_or_skip(value, f"{path}, row {row}", field, doc_format, skipped)
      if doc is not None:
        yield doc


def read_files(paths: Sequence[str], text_key: str, separator: str = "",
               skipped: collections.Counter | None = None,
               doc_format: str = "text") -> Iterator[Document]:
  """Yields the documents of files in order (texts, or conversations with doc_format='chat');
  skipped records are counted in `skipped`."""
  skipped = collections.Counter() if skipped is None else skipped
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
      yield from _json_lines(path, text_key, doc_format, skipped)
    elif ext in TEXT_EXTENSIONS and doc_format == "chat":
      raise DataError(f"{path}: data.format='chat' reads conversations from JSON lines or Parquet "
                      "records with a 'messages' field, not from .txt files")
    elif ext in TEXT_EXTENSIONS:
      yield from _text_lines(path, separator, skipped)
    elif ext in PARQUET_EXTENSIONS:
      yield from _parquet(path, text_key, doc_format, skipped)
    else:
      raise DataError(f"{path}: unsupported file type {ext!r}; allowed: {', '.join(EXTENSIONS)}"
                      " or a directory written by scripts/prepare_dataset.py")

"""Validation documents held out of a source that has no eval split, chosen by a hash of each.

With `data.holdout_fraction` = f > 0, a document is a validation document when the BLAKE2b hash
of its content, read as a number in [0, 1), is below f. The content is a text's UTF-8 bytes, a
conversation's roles, reasoning and contents (as JSON), or a pretokenized document's token ids
(as uint32, whatever the shard's dtype). The choice depends on the document alone: it is the
same on every host, in every run and after a resume, and a document that two sources share is
on the same side in both. Training skips validation documents in every source it reads (a
mixture's too); evaluation reads only them, from the training source: `data.train_files` when
`data.source="files"` has no `eval_files`, or the Hub split when `data.hf_eval_split` is
`data.hf_train_split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

PERSON = b"nanollama-valid"  # the hash's personalisation: unrelated to any other BLAKE2b use
_SCALE = 2.0**-64  # an 8-byte digest as a number in [0, 1)


def content(doc: Any) -> bytes:
  """The bytes a document is hashed by: a text, a conversation (tuple of Message) or token ids."""
  if isinstance(doc, str):
    return doc.encode("utf-8")
  if isinstance(doc, np.ndarray):
    return doc.astype("<u4", copy=False).tobytes()
  return json.dumps([list(message) for message in doc], ensure_ascii=False).encode("utf-8")


def score(doc: Any) -> float:
  """The document's place in [0, 1): its hash, uniform over documents."""
  digest = hashlib.blake2b(content(doc), digest_size=8, person=PERSON).digest()
  return int.from_bytes(digest, "little") * _SCALE


@dataclasses.dataclass(frozen=True)
class Holdout:
  """The side of the hold-out that a split reads: the held-out documents (eval) or the rest."""
  fraction: float
  held_out: bool

  def keeps(self, doc: Any) -> bool:
    """Whether the split reads `doc`."""
    return (score(doc) < self.fraction) == self.held_out

  def __str__(self) -> str:
    side = "held out for validation" if self.held_out else "not held out for validation"
    return f"the documents {side} (data.holdout_fraction={self.fraction})"


def kept(docs: Iterable[Any], holdout: Holdout | None) -> Iterable[Any]:
  """The documents `holdout` keeps, lazily; all of them when there is none."""
  return docs if holdout is None else filter(holdout.keeps, docs)


def eval_reads_train(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the eval split is the training source: a Hub split read for both, or no eval_files."""
  if data_cfg.source == "hf":
    return data_cfg.hf_eval_split == data_cfg.hf_train_split
  return not data_cfg.eval_files


def for_split(data_cfg: ml_collections.ConfigDict, split: str) -> Holdout | None:
  """The hold-out that `split` ('train' or 'eval') reads through; None: every document."""
  fraction = data_cfg.holdout_fraction
  if not fraction or (split == "eval" and not eval_reads_train(data_cfg)):
    return None
  return Holdout(fraction, held_out=split == "eval")


def has_eval_split(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the run evaluates: a Hub eval split, eval_files, or documents held out."""
  return data_cfg.source == "hf" or bool(data_cfg.eval_files) or bool(data_cfg.holdout_fraction)

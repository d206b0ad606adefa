"""Held-out validation: a hash-chosen share of a single-split source, evaluated, never trained on.

The TinyStories sample's train.jsonl (1,100 stories) stands in for a source without an eval
split: as local files, as a Hub dataset (the `datasets` JSON loader, streamed and downloaded),
pretokenized, as conversations and in a mixture.
"""

import collections
import itertools
import json
import math
import os
import pickle
import runpy

import numpy as np
import pytest

from helpers import REPO, tiny_config
from nanollama_jax import data_spec, errors
from nanollama_jax import config, evaluate, model, train
from nanollama_jax.data import CHAT_SAMPLE, holdout, pipeline, records, shards, sources
from nanollama_jax.data.tokenizer_source import load as load_tokenizer

FRACTION = 0.2
KEPT, HELD = 869, 231  # the sample's split at FRACTION: it changes only if the hash does
HELD_CHATS = 70  # of the chat sample's 360 conversations


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return load_tokenizer(str(tokenizer_path))


@pytest.fixture(scope="module")
def texts(sample_dir):
  """Every story of the sample's train.jsonl, in file order."""
  return list(records.read_files([str(sample_dir / "train.jsonl")], "text"))


def _cfg(sample_dir, **fields):
  cfg = config.get_default_config().data
  cfg.update(dict(train_files=str(sample_dir / "train.jsonl"), eval_files="",
                  holdout_fraction=FRACTION, seq_len=64, batch_size=8))
  cfg.update(fields)
  return cfg


def _hub_cfg(sample_dir, tmp_path, monkeypatch, **fields):
  """The sample read through `datasets`' JSON loader: one split, "train", the Hub code path."""
  import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  return _cfg(sample_dir, source="hf", hf_path="json", hf_train_split="train",
              hf_eval_split="train", hf_data_files=str(sample_dir / "train.jsonl"), **fields)


def _split(docs, fraction=FRACTION):
  """(kept, held out), each in the given order."""
  held = [holdout.score(d) < fraction for d in docs]
  return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def _ids(texts, tok):
  return [tuple(tok.encode(t)) for t in texts]


def _whole_docs(windows, tok):
  """The documents that lie whole (BOS to EOS) in consecutive concat windows, as token tuples
  without BOS and EOS."""
  stream = np.concatenate([w["inputs"] for w in windows] + [windows[-1]["targets"][-1:]])
  stream = stream[stream != tok.pad_id]
  parts = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]
  return [tuple(p[1:-1].tolist()) for p in parts if p[-1] == tok.eos_id]


def _rows(batches):
  return [{k: b[k][i] for k in pipeline.KEYS} for b in batches for i in range(len(b["inputs"]))]


def _epoch_windows(ds, docs, cfg, tok):
  """Windows enough to hold a first epoch of `docs` whole, and a little of the second."""
  tokens = sum(len(tok.encode(t)) + 2 for t in docs)
  return list(itertools.islice(ds, tokens // cfg.seq_len + 50))


def _assert_restores(cfg, tok, skip, n=10):
  """A pipeline restored from the state (through JSON) after `skip` batches continues exactly;
  returns the batches it gave and the epoch it reached."""
  it = pipeline.train_batches(cfg, tok)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(n)]
  restored = pipeline.train_batches(cfg, tok)
  restored.set_state(state)
  got = [next(restored) for _ in range(n)]
  for b, o in zip(expected, got):
    for key in pipeline.KEYS:
      np.testing.assert_array_equal(b[key], o[key], err_msg=key)
  return got, restored.epoch


def test_files_eval_reads_held_out_documents_and_training_never_does(sample_dir, tok, texts):
  cfg = _cfg(sample_dir)
  kept, held = _split(texts)
  assert (len(kept), len(held)) == (KEPT, HELD)
  assert sources.documents(cfg, "train") == kept
  assert sources.documents(cfg, "eval") == held
  assert sources.first_documents(cfg, 10**6) == kept  # the tokenizer is trained on them alone
  # Every process evaluates on the same held-out documents, all of them, in file order.
  assert sources.open_split(cfg, "eval", stream=1, streams=2).docs == held
  eval_batches = pipeline.eval_batches(cfg, tok, 1000)
  assert _whole_docs(_rows(eval_batches), tok) == _ids(held, tok)
  again = pipeline.eval_batches(cfg, tok, 1000)  # a pipeline built anew: the same batches
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(eval_batches, again))
  # Each of 2 processes trains on its share of the kept documents: a first epoch of it holds
  # exactly that share, and no window holds a held-out document.
  held_ids = set(_ids(held, tok))
  seen = collections.Counter()
  for index in range(2):
    share = _ids(kept[index::2], tok)
    ds, _ = pipeline.windows(cfg, tok, "train", stream=index, streams=2)
    docs = _whole_docs(_epoch_windows(ds, kept[index::2], cfg, tok), tok)
    assert collections.Counter(docs[:len(share)]) == collections.Counter(share)
    assert not set(docs) & held_ids
    seen.update(docs[:len(share)])
  assert seen == collections.Counter(_ids(kept, tok))


def test_a_resumed_run_keeps_the_split(sample_dir, tok, texts):
  cfg = _cfg(sample_dir)
  kept, held = _split(texts)
  per_epoch = sum(len(tok.encode(t)) + 2 for t in kept) // (cfg.batch_size * cfg.seq_len)
  batches, epoch = _assert_restores(cfg, tok, skip=per_epoch + 5, n=40)  # in a new order
  docs = set(_whole_docs(_rows(batches), tok))
  assert epoch == 1 and len(docs) > 40
  assert docs <= set(_ids(kept, tok)) and not docs & set(_ids(held, tok))


@pytest.mark.slow
def test_a_run_without_eval_files_evaluates_on_the_held_out_documents(sample_dir, tokenizer_path,
                                                                      tok, texts, tmp_path):
  cfg = tiny_config(sample_dir, tokenizer_path, steps=4, log_every=2, eval_every=4, eval_steps=2)
  cfg.optim.warmup_steps = 1
  cfg.data.update(eval_files="", holdout_fraction=FRACTION)
  config.validate(cfg)
  params, last = train.train(cfg, str(tmp_path))
  expected = pipeline.eval_batches(cfg.data, tok, 2)
  assert set(_whole_docs(_rows(expected), tok)) <= set(_ids(_split(texts)[1], tok))
  result = evaluate.mean_loss(evaluate.make_eval_step(model.graph(cfg.model)), params, expected)
  assert last["eval_tokens"] == result["tokens"] == sum(b["loss_mask"].sum() for b in expected)
  assert last["eval_loss"] == pytest.approx(result["loss"], rel=1e-5)


@pytest.mark.parametrize("fraction, count", [(0.01, 11), (0.05, 68), (0.2, HELD), (0.5, 556)])
def test_the_held_out_share_follows_the_fraction(sample_dir, texts, fraction, count):
  cfg = _cfg(sample_dir, holdout_fraction=fraction)
  held, train = sources.documents(cfg, "eval"), sources.documents(cfg, "train")
  n = len(texts)
  assert (len(held), len(train)) == (count, n - count)
  assert abs(count - n * fraction) < 4 * math.sqrt(n * fraction * (1 - fraction))  # binomial
  assert set(held) <= set(sources.documents(_cfg(sample_dir, holdout_fraction=0.5), "eval"))


def test_the_hash_is_uniform():
  scores = np.array([holdout.score(f"document {i}") for i in range(20_000)])
  counts = np.histogram(scores, bins=10, range=(0, 1))[0]
  assert (abs(counts - 2000) < 4 * math.sqrt(20_000 * 0.1 * 0.9)).all()
  assert abs((scores < 0.005).sum() - 100) < 4 * math.sqrt(100)


def test_a_hub_split_holds_out_the_same_documents_streamed_or_downloaded(
    sample_dir, tok, texts, tmp_path, monkeypatch):
  cfg = _hub_cfg(sample_dir, tmp_path, monkeypatch, shuffle_window=50)
  kept, held = _split(texts)
  assert [doc for doc, _ in sources.open_split(cfg, "eval").stream] == held
  assert _whole_docs(_rows(pipeline.eval_batches(cfg, tok, 1000)), tok) == _ids(held, tok)
  # Two processes stream disjoint shares of the kept documents (every other record).
  shares = [[doc for doc, _ in itertools.takewhile(lambda pair: pair[1] == 0, sources.open_split(
    cfg, "train", stream=i, streams=2).stream)] for i in range(2)]
  assert sorted(shares[0] + shares[1]) == sorted(kept)
  # Training windows (shuffled in windows of 50 documents), resumed exactly, hold no held-out one.
  ds, _ = pipeline.windows(cfg, tok, "train")
  docs = _whole_docs(_epoch_windows(ds, kept, cfg, tok), tok)
  assert len(set(docs)) > KEPT - 10 and not set(docs) & set(_ids(held, tok))
  docs = _whole_docs(_rows(_assert_restores(cfg, tok, skip=30)[0]), tok)
  assert set(docs) <= set(_ids(kept, tok))
  # Downloaded and memory-mapped: the same two sets, through the `datasets` filter.
  cfg.hf_streaming = False
  assert list(sources.documents(cfg, "train")) == kept
  assert list(sources.documents(cfg, "eval")) == held


def test_pretokenized_chat_and_mixture_sources_hold_out_too(sample_dir, tok, texts, tmp_path):
  writer = shards.ShardWriter(str(tmp_path / "tokens"), tok, shard_tokens=20_000)
  writer.add(tok.encode(t) for t in texts)
  writer.close()
  ids = [np.array(d, np.int32) for d in _ids(texts, tok)]
  kept, held = _split(ids)  # by token ids: not the text's split
  assert abs(len(held) - 1100 * FRACTION) < 4 * math.sqrt(1100 * FRACTION * (1 - FRACTION))
  cfg = _cfg(sample_dir, train_files=str(tmp_path / "tokens"))
  for split, expected in (("train", kept), ("eval", held)):
    docs = sources.open_split(cfg, split).docs
    assert isinstance(docs, shards.TokenDocuments)
    assert [d.tolist() for d in docs] == [d.tolist() for d in expected]
    assert pickle.loads(pickle.dumps(docs))[len(docs) - 1].tolist() == expected[-1].tolist()
  # Conversations: hashed by their roles, reasoning and contents.
  chats = list(records.read_files([str(CHAT_SAMPLE / "train.jsonl")], "text", doc_format="chat"))
  chat_cfg = _cfg(sample_dir, train_files=str(CHAT_SAMPLE / "train.jsonl"), format="chat")
  kept_chats, held_chats = _split(chats)
  assert len(held_chats) == HELD_CHATS and len(kept_chats) == len(chats) - HELD_CHATS
  assert sources.documents(chat_cfg, "train") == kept_chats
  assert sources.documents(chat_cfg, "eval") == held_chats
  # A mixture: every source skips its held-out documents.
  cfg.mixture = f"{sample_dir / 'train.jsonl'}=0.7;{tmp_path / 'tokens'}=0.3"
  found = [sources.open_split(cfg, "train", globs=g) for g, _ in data_spec.parse_mixture(cfg.mixture)]
  assert found[0].docs == _split(texts)[0] and len(found[1].docs) == len(kept)


@pytest.mark.parametrize("fields, message", [
  (dict(source="hf", hf_eval_split="train", holdout_fraction=0.0),
   "data.hf_eval_split='train': is also data.hf_train_split, so evaluation would read training "
   "documents: set data.holdout_fraction"),
  (dict(source="hf", hf_eval_split="validation", holdout_fraction=0.01),
   "data.holdout_fraction=0.01: holds evaluation documents out of data.hf_train_split, but "
   "data.hf_eval_split='validation' is an eval split of its own"),
  (dict(train_files="web.jsonl", eval_files="web.jsonl", holdout_fraction=0.0),
   "data.eval_files='web.jsonl': is also data.train_files, so evaluation would read training "
   "documents: set data.holdout_fraction (e.g. 0.005) to evaluate on a share held out of "
   "training (and leave eval_files empty)"),
  (dict(eval_files="val.jsonl", holdout_fraction=0.01),
   "data.holdout_fraction=0.01: holds evaluation documents out of data.train_files, but "
   "data.eval_files='val.jsonl' is an eval split of its own: set the fraction to 0, or leave "
   "eval_files empty"),
  (dict(train_files="", mixture="a.jsonl=1"),
   "data.holdout_fraction=0.2: evaluates on documents held out of data.train_files, which is "
   "empty"),
  (dict(holdout_fraction=0.7), "data.holdout_fraction=0.7: must be a number in [0, 0.5]"),
  (dict(holdout_fraction=-0.1), "data.holdout_fraction=-0.1: must be a number in [0, 0.5]"),
])
def test_config_refuses_evaluating_on_training_documents(sample_dir, fields, message):
  cfg = config.get_default_config()
  cfg.data = _cfg(sample_dir, **fields)
  with pytest.raises(errors.ConfigError) as err:
    config.validate(cfg, check_files=False)
  assert message in str(err.value)


@pytest.mark.parametrize("recipe", ["dense_180m", "tinyllama_1b", "llama3_2_1b", "llama3_1_8b"])
def test_fineweb_recipes_evaluate_on_held_out_documents(recipe):
  cfg = runpy.run_path(os.path.join(REPO, "configs", f"{recipe}.py"))["get_config"]()
  config.validate(cfg, check_files=False)
  d = cfg.data
  assert (d.hf_path, d.hf_eval_split, d.holdout_fraction) == (
    "HuggingFaceFW/fineweb-edu", d.hf_train_split, 0.005)
  assert holdout.for_split(d, "eval") == holdout.Holdout(0.005, held_out=True)

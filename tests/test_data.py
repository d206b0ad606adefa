"""Tests of the document sources and the grain pipeline: packing, shuffling, batches, eval."""

import collections
import itertools
import json

import grain
import numpy as np
import pytest

from nanollama_jax import config
from nanollama_jax.data import pipeline, sources
from nanollama_jax.data.tokenizer import Tokenizer

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return Tokenizer(str(tokenizer_path))


def _data_cfg(sample_dir, **fields):
  cfg = config.get_default_config().data
  cfg.train_files = str(sample_dir / "train.jsonl")
  cfg.eval_files = str(sample_dir / "validation.jsonl")
  cfg.seq_len = 128
  cfg.batch_size = 8
  cfg.update(fields)
  return cfg


# Sources.


def test_file_documents(sample_dir):
  cfg = _data_cfg(sample_dir)
  train, evals = sources.documents(cfg, "train"), sources.documents(cfg, "eval")
  assert (len(train), len(evals)) == (1100, 154)
  assert train[0].startswith("One day, a little girl named Lily found a needle")
  assert sources.first_documents(cfg, 5) == train[:5]
  assert len(sources.first_documents(cfg, 10**6)) == 1100


def test_txt_files_one_document_per_non_empty_line(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n", encoding="utf-8")
  assert list(sources.read_files([str(tmp_path / "a.txt")], "text")) == ["first doc", "second doc"]


@pytest.mark.parametrize("name, content, error", [
  ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl, line 2: not valid JSON"),
  ("nokey.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n',
   r"nokey.jsonl, line 3: no field 'text' \(data.text_key\); the record has \['body'\]"),
  ("num.json", '{"text": 5}\n', r"num.json, line 1: field 'text' is a int, not a string"),
  ("data.csv", "text\nhello\n",
   r"data.csv: unsupported file type '.csv'; allowed: .jsonl, .json, .txt"),
])
def test_file_errors_name_file_line_and_key(tmp_path, name, content, error):
  (tmp_path / name).write_text(content, encoding="utf-8")
  with pytest.raises(ValueError, match=error):
    list(sources.read_files([str(tmp_path / name)], "text"))


def test_unknown_split(sample_dir):
  with pytest.raises(ValueError, match="split='test': allowed: train, eval"):
    sources.documents(_data_cfg(sample_dir), "test")


def test_hf_documents_from_local_json(sample_dir, tmp_path, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
  files = str(sample_dir / "validation.jsonl")
  docs = sources.hf_documents("json", None, "train", "text", data_files=files)
  expected = sources.documents(_data_cfg(sample_dir), "eval")
  assert len(docs) == 154
  assert (docs[0], docs[153]) == (expected[0], expected[153])
  with pytest.raises(ValueError, match="data.text_key='story' is not a column .* columns: text"):
    sources.hf_documents("json", None, "train", "story", data_files=files)


def test_hub_failure_names_the_dataset_and_the_way_out(sample_dir, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top

  def unreachable(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub")

  monkeypatch.setattr(datasets, "load_dataset", unreachable)
  cfg = _data_cfg(sample_dir)
  cfg.source = "hf"
  with pytest.raises(config.ConfigError) as err:
    sources.documents(cfg, "train")
  assert "data.hf_path='roneneldan/TinyStories': cannot load split 'train'" in str(err.value)
  assert "--config.data.source=files" in str(err.value)


# Packing.


def _pack(docs, seq_len, pad_id=3):
  ds = grain.MapDataset.source([np.array(d, np.int32) for d in docs]).to_iter_dataset()
  return list(pipeline._PackIterDataset(ds, seq_len, pad_id))  # pylint: disable=protected-access


def test_packing_boundaries_by_hand():
  a, b, c = [1, 10, 11, 12, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 35, 2]
  w = _pack([a, b, c], seq_len=6)
  assert len(w) == 3
  expected = [
    # inputs, targets, segment_ids, positions, loss_mask
    ([1, 10, 11, 12, 2, 1], [10, 11, 12, 2, 1, 20], [1, 1, 1, 1, 1, 2], [0, 1, 2, 3, 4, 0],
     [1, 1, 1, 1, 0, 1]),
    ([20, 2, 1, 30, 31, 32], [2, 1, 30, 31, 32, 33], [1, 1, 2, 2, 2, 2], [0, 1, 0, 1, 2, 3],
     [1, 0, 1, 1, 1, 1]),
    ([33, 34, 35, 2, 3, 3], [34, 35, 2, 3, 3, 3], [1, 1, 1, 1, 0, 0], [0, 1, 2, 3, 0, 0],
     [1, 1, 1, 0, 0, 0]),
  ]
  for window, values in zip(w, expected):
    for key, value in zip(KEYS, values):
      np.testing.assert_array_equal(window[key], value, err_msg=key)
      assert window[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
  assert sum(x["loss_mask"].sum() for x in w) == 13  # 16 tokens, all but the 3 BOS are targets


def test_packing_without_a_short_last_window():
  w = _pack([[1, 10, 11, 12, 2], [1, 20, 2], [1, 40, 41, 42, 2]], seq_len=6)  # 13 = 2 * 6 + 1
  assert len(w) == 2
  np.testing.assert_array_equal(w[1]["targets"], [2, 1, 40, 41, 42, 2])
  np.testing.assert_array_equal(w[1]["loss_mask"], [1, 0, 1, 1, 1, 1])


def _stream(windows):
  """The token stream the windows were cut from: consecutive windows share one token."""
  return np.concatenate([w["inputs"] for w in windows] + [windows[-1]["targets"][-1:]])


def _split_docs(stream, tok):
  """The complete documents of a stream, as tuples of tokens without BOS and EOS."""
  stream = stream[stream != tok.pad_id]
  docs = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]
  if docs[-1][-1] != tok.eos_id:
    docs.pop()  # cut off by the end of the windows
  assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
  return [tuple(d[1:-1].tolist()) for d in docs]


def test_train_stream_holds_every_document_once_per_epoch(sample_dir, tok):
  cfg = _data_cfg(sample_dir)
  texts = sources.documents(cfg, "train")
  expected = collections.Counter(tuple(tok.encode(t)) for t in texts)
  n = len(texts)
  tokens_per_epoch = sum(expected[d] * (len(d) + 2) for d in expected)
  windows = list(itertools.islice(pipeline.windows(cfg, tok, "train"),
                                  2 * tokens_per_epoch // cfg.seq_len + 100))
  docs = _split_docs(_stream(windows), tok)
  epoch1, epoch2 = docs[:n], docs[n:2 * n]
  assert collections.Counter(epoch1) == expected
  assert collections.Counter(epoch2) == expected
  assert epoch1 != epoch2
  assert epoch1 != [tuple(tok.encode(t)) for t in texts]  # shuffled
  for w in windows:
    assert w["inputs"].shape == (cfg.seq_len,)
    np.testing.assert_array_equal(w["loss_mask"], w["inputs"] != tok.eos_id)
    assert (w["positions"][w["inputs"] == tok.bos_id] == 0).all()


def _batches(cfg, tok, n):
  it = pipeline.train_batches(cfg, tok)
  batches = list(itertools.islice(it, n))
  it.close()
  return batches


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for b, o in zip(batches, others):
    for key in KEYS:
      np.testing.assert_array_equal(b[key], o[key], err_msg=key)


def test_train_batches_shapes_and_determinism(sample_dir, tok):
  cfg = _data_cfg(sample_dir, batch_size=4, seq_len=32)
  batches = _batches(cfg, tok, 3)
  for key in KEYS:
    assert batches[0][key].shape == (4, 32)
    assert batches[0][key].dtype == (np.float32 if key == "loss_mask" else np.int32)
  _assert_same(batches, _batches(cfg, tok, 3))
  other = _batches(_data_cfg(sample_dir, batch_size=4, seq_len=32, shuffle_seed=1), tok, 1)[0]
  assert not np.array_equal(batches[0]["inputs"], other["inputs"])


def test_worker_processes_give_the_same_batches(sample_dir, tok):
  cfg = _data_cfg(sample_dir, batch_size=16, seq_len=64)
  in_process = _batches(cfg, tok, 40)  # 40 * 16 * 64 tokens: past the first 32-document chunks
  cfg.num_workers = 2
  _assert_same(in_process, _batches(cfg, tok, 40))


def test_iterator_state_restores_the_stream(sample_dir, tok):
  cfg = _data_cfg(sample_dir, seq_len=64)
  it = iter(pipeline.windows(cfg, tok, "train"))
  for _ in range(777):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(50)]
  restored = iter(pipeline.windows(cfg, tok, "train"))
  restored.set_state(state)
  _assert_same(expected, [next(restored) for _ in range(50)])


def test_batch_iterator_state_survives_json_and_worker_processes(sample_dir, tok):
  """The state a checkpoint stores (as JSON) restores the batch stream, with workers too."""
  cfg = _data_cfg(sample_dir, batch_size=8, seq_len=64)
  expected = _batches(cfg, tok, 40)[30:]
  cfg.num_workers = 2
  it = pipeline.train_batches(cfg, tok)
  for _ in range(30):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  restored = pipeline.train_batches(cfg, tok)
  restored.set_state(state)
  _assert_same(expected, [next(restored) for _ in range(10)])
  restored.close()


# Evaluation.


def test_eval_batches_count_every_token_once(sample_dir, tok):
  cfg = _data_cfg(sample_dir)
  batches = pipeline.eval_batches(cfg, tok, max_batches=1000)
  texts = sources.documents(cfg, "eval")
  doc_tokens = sum(len(tok.encode(t)) + 2 for t in texts)  # with BOS and EOS
  windows = -(-(doc_tokens - 1) // cfg.seq_len)  # all tokens but the first are targets
  assert len(batches) == -(-windows // cfg.batch_size)
  assert sum(b["loss_mask"].sum() for b in batches) == sum(len(tok.encode(t)) + 1 for t in texts)
  last = batches[-1]
  assert last["inputs"].shape == (cfg.batch_size, cfg.seq_len)
  padded_rows = len(batches) * cfg.batch_size - windows
  assert padded_rows > 0
  assert last["loss_mask"][-padded_rows:].sum() == 0
  assert (last["inputs"][-padded_rows:] == tok.pad_id).all()
  _assert_same(batches, pipeline.eval_batches(cfg, tok, max_batches=1000))
  _assert_same(batches[:2], pipeline.eval_batches(cfg, tok, max_batches=2))
  docs = _split_docs(_stream([{k: b[k][i] for k in KEYS} for b in batches
                              for i in range(cfg.batch_size)][:windows]), tok)
  assert docs == [tuple(tok.encode(t)) for t in texts]  # in file order, none dropped


def test_empty_split_is_an_error(sample_dir, tok, tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
  cfg = _data_cfg(sample_dir, eval_files=str(tmp_path / "empty.jsonl"))
  with pytest.raises(ValueError, match="the eval split has no documents"):
    pipeline.eval_batches(cfg, tok, max_batches=10)

"""Tests of the document sources and the grain pipeline: packing, shuffling, batches, eval."""

import collections
import importlib.util
import itertools
import json
import os
import pathlib
import pickle

import grain
import numpy as np
import pytest

from helpers import assistant_tokens
from nanollama_jax import config, data_spec, errors
from nanollama_jax.data import hub_data, pipeline, records, shards, sources
from nanollama_jax.data.tokenizer_source import load as load_tokenizer

KEYS = pipeline.KEYS


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return load_tokenizer(str(tokenizer_path))


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
  assert list(records.read_files([str(tmp_path / "a.txt")], "text")) == ["first doc", "second doc"]


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
    list(records.read_files([str(tmp_path / name)], "text"))


def test_unknown_split(sample_dir):
  with pytest.raises(ValueError, match="split='test': allowed: train, eval"):
    sources.documents(_data_cfg(sample_dir), "test")


def test_hf_documents_from_local_json(sample_dir, tmp_path, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
  files = str(sample_dir / "validation.jsonl")
  docs = hub_data.hf_documents("json", None, "train", "text", data_files=files)
  expected = sources.documents(_data_cfg(sample_dir), "eval")
  assert len(docs) == 154
  assert (docs[0], docs[153]) == (expected[0], expected[153])
  with pytest.raises(ValueError, match="data.text_key='story' is not a column .* columns: text"):
    hub_data.hf_documents("json", None, "train", "story", data_files=files)


@pytest.fixture
def local_hub(monkeypatch):
  """A reachable stand-in for the Hub endpoint: an HTTP server on 127.0.0.1 that answers 404."""
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top

  server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  thread = threading.Thread(target=server.serve_forever)
  thread.start()
  monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
  yield
  server.shutdown()
  server.server_close()
  thread.join()  # no thread may end later, inside another test


def test_hub_failure_names_the_dataset_and_the_way_out(sample_dir, local_hub, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top

  def missing(*args, **kwargs):
    raise FileNotFoundError("Dataset 'roneneldan/TinyStories' doesn't exist on the Hub")

  monkeypatch.setattr(datasets, "load_dataset", missing)
  cfg = _data_cfg(sample_dir)
  cfg.source = "hf"
  with pytest.raises(errors.ConfigError) as err:
    sources.documents(cfg, "train")
  assert "data.hf_path='roneneldan/TinyStories': cannot load split 'train'" in str(err.value)
  assert "--config.data.source=files" in str(err.value)


def test_an_unreachable_hub_is_reported_as_the_network_at_once(sample_dir, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
  calls = []
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
  cfg = _data_cfg(sample_dir)
  cfg.source = "hf"
  for streaming in (True, False):
    cfg.hf_streaming = streaming
    with pytest.raises(errors.HubUnreachable, match=f"cannot reach the Hugging Face Hub at "
                       f"http://127.0.0.1:{port} to read 'roneneldan/TinyStories'"):
      sources.open_split(cfg, "train")
  assert not calls  # datasets never started its retries
  # Local folders, packaged loaders and the offline cache need no network: never probed.
  hub_data.check_hub_reachable("json")
  hub_data.check_hub_reachable(str(sample_dir))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  hub_data.check_hub_reachable("roneneldan/TinyStories")


# Packing.


def _pack(docs, seq_len, pad_id=3):
  ds = grain.MapDataset.source([
    {"tokens": np.array(d, np.int32), "trained": np.ones(len(d), np.uint8), "epoch": 0}
    for d in docs])
  return list(pipeline._PackIterDataset(ds.to_iter_dataset(), seq_len, pad_id))  # pylint: disable=protected-access


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
  windows = list(itertools.islice(pipeline.windows(cfg, tok, "train")[0],
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


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(sample_dir, tok):
  cfg = _data_cfg(sample_dir, batch_size=16, seq_len=64)
  in_process = _batches(cfg, tok, 40)  # 40 * 16 * 64 tokens: past the first 32-document chunks
  cfg.num_workers = 2
  _assert_same(in_process, _batches(cfg, tok, 40))


def test_iterator_state_restores_the_stream(sample_dir, tok):
  cfg = _data_cfg(sample_dir, seq_len=64)
  it = iter(pipeline.windows(cfg, tok, "train")[0])
  for _ in range(777):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(50)]
  restored = iter(pipeline.windows(cfg, tok, "train")[0])
  restored.set_state(state)
  _assert_same(expected, [next(restored) for _ in range(50)])


@pytest.mark.slow
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
  with pytest.raises(ValueError, match=r"the eval split \(.*empty.jsonl\) has no documents"):
    pipeline.eval_batches(cfg, tok, max_batches=10)


# More sources and bad input.


def test_parquet_txt_separator_and_skipped_records(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  pq.write_table(pa.table({"body": ["first", None, "  ", "second"], "id": [1, 2, 3, 4]}),
                 tmp_path / "a.parquet")
  (tmp_path / "b.txt").write_bytes(b"one\n<|sep|>\ntwo \xff broken<|sep|><|sep|>three\n<|sep|>\n")
  (tmp_path / "c.jsonl").write_bytes(b'{"body": "ok"}\n{"body": "bad \xc3"}\n{"body": ""}\n')
  skipped = collections.Counter()
  docs = list(records.read_files([str(tmp_path / n) for n in ("a.parquet", "b.txt", "c.jsonl")],
                                 "body", separator="<|sep|>", skipped=skipped))
  assert docs == ["first", "second", "one", "three", "ok"]
  assert skipped == {records.EMPTY: 4, records.BAD_UTF8: 2}
  with pytest.raises(ValueError, match=r"a.parquet: no column 'text' .*columns: body, id"):
    list(records.read_files([str(tmp_path / "a.parquet")], "text"))
  (tmp_path / "d.parquet").write_text("not parquet")
  with pytest.raises(ValueError, match="d.parquet: not a readable Parquet file"):
    list(records.read_files([str(tmp_path / "d.parquet")], "text"))


def test_glob_without_match_and_mixed_kinds_are_config_errors(sample_dir, tok, tmp_path):
  cfg = _data_cfg(sample_dir, train_files=str(tmp_path / "nothing*.jsonl"))
  with pytest.raises(errors.ConfigError, match=r"data.train_files=.*no file matches"):
    sources.open_split(cfg, "train")
  _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val_tokens")
  cfg.train_files = f"{tmp_path / 'val_tokens'},{sample_dir / 'train.jsonl'}"
  with pytest.raises(errors.ConfigError, match="both pretokenized datasets and text files"):
    sources.open_split(cfg, "train")
  (tmp_path / "plain_dir").mkdir()
  cfg.train_files = str(tmp_path / "plain_dir")
  with pytest.raises(errors.ConfigError, match="without index.json; write it with"):
    sources.open_split(cfg, "train")


@pytest.mark.parametrize("spec, error", [
  ("a.jsonl", "is not SOURCE=WEIGHT"), ("a.jsonl=0", "weight > 0"), ("a=x;b=1", "'a=x'"),
  (" ; ", "no entries")])
def test_mixture_spec_errors(spec, error):
  with pytest.raises(errors.ConfigError, match=error):
    data_spec.parse_mixture(spec)
  assert data_spec.parse_mixture("web/*.jsonl,b.txt=0.7; code=0.3") == [("web/*.jsonl,b.txt", 0.7),
                                                                      ("code", 0.3)]


def test_hub_mixture_entries_name_path_config_split_and_key():
  spec = "hf:HuggingFaceFW/fineweb-edu:sample-10BT=0.7;hf:org/code@validation#content=0.2;d=0.1"
  assert data_spec.parse_mixture(spec) == [("hf:HuggingFaceFW/fineweb-edu:sample-10BT", 0.7),
                                        ("hf:org/code@validation#content", 0.2), ("d", 0.1)]
  assert data_spec.parse_hub_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == data_spec.HubSource(
    "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", None)
  assert data_spec.parse_hub_source("hf:org/code@validation#content") == data_spec.HubSource(
    "org/code", None, "validation", "content")
  for bad in ("hf:", "hf:org/x:", "hf:org/x@", "hf:org/x#"):
    with pytest.raises(errors.ConfigError, match="is not hf:PATH"):
      data_spec.parse_mixture(f"{bad}=1")


# Pretokenized datasets.


def _prepare(path, tok, out, *extra):
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "prepare_dataset.py"
  spec = importlib.util.spec_from_file_location("prepare_dataset", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.prepare(module.parse_args(
    ["--tokenizer", tok.source, "--input", str(path), "--out", str(out), *extra]))


def test_prepared_dataset_holds_the_tokenized_documents(sample_dir, tok, tmp_path):
  summary = _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val", "--shard-tokens",
                     "20000")
  texts = sources.documents(_data_cfg(sample_dir), "eval")
  expected = [tok.encode(t) for t in texts]
  assert summary["documents"] == 154 and summary["tokens"] == sum(map(len, expected))
  assert summary["shards"] == len(os.listdir(tmp_path / "val")) // 2 - 1 > 1
  docs = shards.TokenDocuments([str(tmp_path / "val")])
  assert len(docs) == 154 and docs.num_tokens == summary["tokens"]
  for i in (0, 1, 77, 153):
    assert docs[i].dtype == np.int32 and docs[i].tolist() == expected[i]
  assert pickle.loads(pickle.dumps(docs))[153].tolist() == expected[153]
  with pytest.raises(FileExistsError, match="exists: choose a new directory or pass --overwrite"):
    _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val")
  assert not (tmp_path / "val.tmp").exists()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_pretokenized_batches_equal_on_the_fly_batches(sample_dir, tok, tmp_path, packing):
  """Same documents, same shuffle seed: the prepared dataset gives the very same batches."""
  _prepare(sample_dir / "train.jsonl", tok, tmp_path / "train")
  cfg = _data_cfg(sample_dir, batch_size=4, seq_len=64, packing=packing)
  from_text = _batches(cfg, tok, 300)  # 300 * 4 * 64 tokens: more than one epoch of the sample
  cfg.train_files = str(tmp_path / "train")
  _assert_same(from_text, _batches(cfg, tok, 300))


def test_pretokenized_with_another_tokenizer_is_refused(sample_dir, tok, tmp_path):
  _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val")
  other = load_tokenizer(str(tmp_path / "val" / "tokenizer.model"))
  other._proto += b"\0"  # pylint: disable=protected-access  # any other model bytes
  cfg = _data_cfg(sample_dir, train_files=str(tmp_path / "val"))
  with pytest.raises(ValueError, match="prepared with another tokenizer than this run's"):
    pipeline.train_batches(cfg, other)
  assert sources.pretokenized_dataset(cfg) == str(tmp_path / "val")


# First-fit packing.


def _first_fit(docs, seq_len, bins, pad_id=3):
  return _packed([np.array(d, np.int32) for d in docs], seq_len, "first_fit", bins, pad_id)


def _packed(docs, seq_len, packing, bins=4, pad_id=3):
  """The eval windows of token arrays or conversations (with the fake tokenizer)."""
  cfg = config.get_default_config().data
  cfg.update(seq_len=seq_len, packing=packing, pack_bins=bins)
  found = sources.Documents("docs", docs=docs)
  windows_of = pipeline._windows_of  # pylint: disable=protected-access
  return list(windows_of(found, cfg, _FakeTokenizer(pad_id), False, 0, 0, 0, 1))


class _FakeTokenizer:
  """Token ids written as text: "20 21" encodes to [20, 21]."""
  bos_id, eos_id, fingerprint, source, has_chat_tokens, chat_template = 1, 2, "", "fake", True, None

  def __init__(self, pad_id):
    self.pad_id = pad_id

  def encode_batch(self, texts):
    return [[int(word) for word in text.split()] for text in texts]


def test_first_fit_packing_by_hand():
  # Documents (as [1] + ids + [2]) of 4, 9 and 3 tokens, in windows of 6 + 1: the 9-token one
  # is cut into pieces of 7 and 3 tokens that overlap by one. First fit: the 4 opens bin 1, the
  # 7 opens bin 2, the 3 joins bin 1 (4 + 3 = 7), the last 3 fits only in a new bin 3.
  w = _first_fit([[10, 11], [20, 21, 22, 23, 24, 25, 26], [30]], seq_len=6, bins=4)
  assert len(w) == 3
  expected = [
    ([1, 10, 11, 2, 25, 26], [10, 11, 2, 25, 26, 2], [1, 1, 1, 1, 2, 2], [0, 1, 2, 3, 0, 1],
     [1, 1, 1, 0, 1, 1]),
    ([1, 20, 21, 22, 23, 24], [20, 21, 22, 23, 24, 25], [1] * 6, [0, 1, 2, 3, 4, 5], [1] * 6),
    ([1, 30, 2, 3, 3, 3], [30, 2, 3, 3, 3, 3], [1, 1, 1, 0, 0, 0], [0, 1, 2, 0, 0, 0],
     [1, 1, 0, 0, 0, 0]),
  ]
  for window, values in zip(w, expected):
    for key, value in zip(KEYS, values):
      np.testing.assert_array_equal(window[key], value, err_msg=key)
  assert sum(x["loss_mask"].sum() for x in w) == 13  # 16 tokens, all but the 3 BOS are targets


def test_first_fit_counts_every_token_once_and_reports_padding(sample_dir, tok):
  padding = {}
  for packing in ("concat", "first_fit"):
    cfg = _data_cfg(sample_dir, packing=packing, pack_bins=32)
    batches = pipeline.eval_batches(cfg, tok, max_batches=1000)
    texts = sources.documents(cfg, "eval")
    assert sum(b["loss_mask"].sum() for b in batches) == sum(len(tok.encode(t)) + 1 for t in texts)
    it = pipeline.train_batches(cfg, tok)
    for _ in range(50):
      next(it)
    padding[packing] = it.padding_fraction
  assert padding["concat"] == 0.0
  assert 0.0 < padding["first_fit"] < 0.2


# Per-host shares, epochs, mixtures, exact restore.


def _whole_docs(batches, tok):
  """The documents that lie whole (BOS to EOS) in single windows, without BOS and EOS."""
  out = set()
  for b in batches:
    for inputs, targets in zip(b["inputs"], b["targets"]):
      row = np.append(inputs, targets[-1])
      for part in np.split(row, np.flatnonzero(row == tok.bos_id)):
        end = np.flatnonzero(part == tok.eos_id)
        if len(part) and part[0] == tok.bos_id and len(end):
          out.add(tuple(part[1:end[0]].tolist()))
  return out


def _rows(batches):
  return [{k: b[k][i] for k in KEYS} for b in batches for i in range(len(b["inputs"]))]


@pytest.mark.parametrize("pretokenized", [False, True])
def test_hosts_read_disjoint_shares_that_cover_the_data(sample_dir, tok, tmp_path, pretokenized):
  cfg = _data_cfg(sample_dir, batch_size=8, seq_len=128, packing="first_fit")
  if pretokenized:
    _prepare(sample_dir / "train.jsonl", tok, tmp_path / "train")
    cfg.train_files = str(tmp_path / "train")
  docs = [tuple(tok.encode(t)) for t in sources.documents(_data_cfg(sample_dir), "train")]
  fitting = {d for d in docs if len(d) + 2 <= 129}  # the ones first-fit never cuts
  shares = []
  for index in range(4):
    it = pipeline.train_batches(cfg, tok, share=index, shares=4)
    batches = []
    while it.epoch < 2:  # two epochs of this host's share: the first is surely all emitted
      batches.append(next(it))
    assert all(b["inputs"].shape == (2, 128) for b in batches)
    shares.append(_whole_docs(batches, tok))
  for a, b in itertools.combinations(shares, 2):
    assert not a & b
  assert set().union(*shares) == fitting
  assert len(fitting) > 150


def test_epochs_are_counted(sample_dir, tok):
  cfg = _data_cfg(sample_dir, batch_size=8, seq_len=128)
  it = pipeline.train_batches(cfg, tok)
  tokens_per_epoch = sum(len(tok.encode(t)) + 2 for t in sources.documents(cfg, "train"))
  steps_per_epoch = tokens_per_epoch / (8 * 128)
  changes = []
  for step in range(1, int(2.5 * steps_per_epoch)):
    before = it.epoch
    next(it)
    if it.epoch != before:
      changes.append(step)
  assert len(changes) == 2
  assert abs(changes[0] - steps_per_epoch) < 1.5 and abs(changes[1] - 2 * steps_per_epoch) < 1.5


def _mixture_cfg(sample_dir, tmp_path, tok):
  _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val_tokens")
  mixture = f"{sample_dir / 'train.jsonl'}=0.7;{tmp_path / 'val_tokens'}=0.3"
  return _data_cfg(sample_dir, batch_size=8, seq_len=64, mixture=mixture)


def test_mixture_shares_follow_the_weights(sample_dir, tok, tmp_path):
  cfg = _mixture_cfg(sample_dir, tmp_path, tok)
  it = pipeline.train_batches(cfg, tok)
  batches = [next(it) for _ in range(400)]  # 3200 windows
  assert it.names == [str(sample_dir / "train.jsonl"), str(tmp_path / "val_tokens")]
  share = it.windows / it.windows.sum()
  np.testing.assert_allclose(share, [0.7, 0.3], atol=0.01)
  assert it.epochs == [0, 1]  # 960 windows of the 900-window source: into its second epoch
  _assert_same(batches[:5], _batches(cfg, tok, 5))  # deterministic
  # Each window's source tag is true: its first 16 tokens (within one document) occur in that
  # source's documents.
  grams = []
  for split in ("train", "eval"):
    grams.append(set())
    for text in sources.documents(cfg, split):
      ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
      grams[-1].update(tuple(ids[i:i + 16]) for i in range(len(ids) - 15))
  unique = collections.Counter()
  for window in itertools.islice(pipeline.windows(cfg, tok, "train")[0], 400):
    head = tuple(window["inputs"][:16].tolist())
    if (window["segment_ids"][:16] == window["segment_ids"][0]).all():
      source = int(window["source"])
      assert head in grams[source]
      unique[source] += head not in grams[1 - source]
  assert unique[0] > 100 and unique[1] > 40


def _restores(cfg, tok, skip, n=10):
  it = pipeline.train_batches(cfg, tok)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(n)]
  epochs = list(it.epochs)
  it.close()
  restored = pipeline.train_batches(cfg, tok)
  restored.set_state(state)
  _assert_same(expected, [next(restored) for _ in range(n)])
  assert restored.epochs == epochs
  restored.close()


def _hub_mixture_cfg(sample_dir, tmp_path, monkeypatch):
  """70% the sample's train.jsonl, 30% a folder of JSONL files read as a Hub dataset (the
  `datasets` loader a Hub path goes through, without the network)."""
  import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  hub = tmp_path / "hub_dataset"
  hub.mkdir()
  lines = (sample_dir / "validation.jsonl").read_text().splitlines(keepends=True)
  for i in range(2):  # two files: two processes can take one each
    (hub / f"part-{i}.jsonl").write_text("".join(lines[i::2]))
  mixture = f"{sample_dir / 'train.jsonl'}=0.7;hf:{hub}=0.3"
  return _data_cfg(sample_dir, batch_size=8, seq_len=64, mixture=mixture, shuffle_window=40)


def test_a_hub_source_in_a_mixture_streams_shares_and_restores(sample_dir, tok, tmp_path,
                                                               monkeypatch):
  cfg = _hub_mixture_cfg(sample_dir, tmp_path, monkeypatch)
  it = pipeline.train_batches(cfg, tok)
  for _ in range(400):  # 3,200 windows
    next(it)
  assert it.names == [str(sample_dir / "train.jsonl"), f"hf:{tmp_path / 'hub_dataset'}"]
  np.testing.assert_allclose(it.windows / it.windows.sum(), [0.7, 0.3], atol=0.01)
  # 960 windows of the ~900-window stream: it started over, counting its own epochs.
  assert it.epochs == [0, 1]
  it.close()
  _restores(cfg, tok, 60)  # a resumed mixture continues exactly, Hub stream included
  # Each process streams its own share of the Hub source: whole files, disjoint.
  shares = []
  for index in range(2):
    found = sources.open_split(cfg, "train", stream=index, streams=2,
                               globs=f"hf:{tmp_path / 'hub_dataset'}")
    shares.append({text for text, epoch in itertools.takewhile(
      lambda pair: pair[1] == 0, iter(found.stream))})
  texts = set(sources.documents(_data_cfg(sample_dir), "eval"))
  assert shares[0] | shares[1] == texts and not shares[0] & shares[1]


def test_restore_continues_pretokenized_first_fit_and_mixture(sample_dir, tok, tmp_path):
  _prepare(sample_dir / "train.jsonl", tok, tmp_path / "train")
  _restores(_data_cfg(sample_dir, seq_len=64, train_files=str(tmp_path / "train")), tok, 77)
  _restores(_data_cfg(sample_dir, seq_len=64, packing="first_fit"), tok, 77)
  _restores(_mixture_cfg(sample_dir, tmp_path, tok), tok, 130)
  with pytest.raises(ValueError, match="does not match this pipeline"):
    pipeline.train_batches(_data_cfg(sample_dir), tok).set_state({"parent": 1, "offset": 0})


# Hub streams, through the `datasets` library's local-file path.


def _hub_cfg(sample_dir, tmp_path, monkeypatch, **fields):
  import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  return _data_cfg(sample_dir, source="hf", hf_path="json", hf_train_split="train",
                   hf_eval_split="train", hf_data_files=str(sample_dir / "validation.jsonl"),
                   **fields)


def test_hub_stream_shuffles_in_windows_and_restores(sample_dir, tok, tmp_path, monkeypatch):
  cfg = _hub_cfg(sample_dir, tmp_path, monkeypatch, batch_size=4, seq_len=64, shuffle_window=50)
  texts = sources.documents(_data_cfg(sample_dir), "eval")
  expected = [tuple(tok.encode(t)) for t in texts]
  # Evaluation reads the stream once, in order.
  eval_docs = _split_docs(_stream(_rows(pipeline.eval_batches(cfg, tok, 1000))), tok)
  assert eval_docs == expected
  # Training: every document once per epoch, shuffled within windows of 50 documents.
  it = pipeline.train_batches(cfg, tok)
  batches = []
  while it.epoch == 0:
    batches.append(next(it))
  docs = _split_docs(_stream(_rows(batches[:-1])), tok)
  assert docs != expected[:len(docs)] and set(docs) <= set(expected)
  assert len(docs) >= len(expected) - 10
  assert all(abs(expected.index(d) - i) < 100 for i, d in enumerate(docs))  # windows of 50
  _restores(cfg, tok, 20)
  _restores(cfg, tok, len(batches) + 3)  # in the second epoch


def test_hub_stream_hosts_and_bad_records(sample_dir, tok, tmp_path, monkeypatch):
  cfg = _hub_cfg(sample_dir, tmp_path, monkeypatch)
  shares = [list(hub_data.HubStream("json", None, "train", "text", cfg.hf_data_files,
                                   stream=i, streams=2)) for i in range(2)]
  texts = sources.documents(_data_cfg(sample_dir), "eval")
  assert sorted(t for share in shares for t, _ in share) == sorted(texts)
  assert not {t for t, _ in shares[0]} & {t for t, _ in shares[1]}
  (tmp_path / "bad.jsonl").write_text('{"text": "a story"}\n{"text": ""}\n{"body": "x"}\n')
  stream = hub_data.HubStream("json", None, "train", "text", str(tmp_path / "bad.jsonl"))
  assert list(stream) == [("a story", 0)]
  assert stream.skipped == {records.EMPTY: 2}  # "" and the record without text (null)
  (tmp_path / "other.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"data.text_key='text' is not a field of json .*body"):
    next(iter(hub_data.HubStream("json", None, "train", "text", str(tmp_path / "other.jsonl"))))
  (tmp_path / "empty.jsonl").write_text('{"text": " "}\n')
  with pytest.raises(ValueError, match="the stream has no documents"):
    next(iter(hub_data.HubStream("json", None, "train", "text", str(tmp_path / "empty.jsonl"),
                                repeat=True)))


# The chat format.


M = records.Message
# With the fake tokenizer, [1, 5, 20, 21, 7, 6, 8, 40, 9, 30, 31, 7, 2] and
# [1, 4, 50, 7, 5, 22, 7, 6, 32, 7, 2]: the assistant writes 8 40 9 30 31 7 and 32 7.
CHATS = [(M("user", "20 21"), M("assistant", "30 31", "40")),
         (M("system", "50"), M("user", "22"), M("assistant", "32"))]


@pytest.mark.parametrize("packing, expected", [
  ("concat", [  # windows of 9 tokens, 8 apart
    ([1, 5, 20, 21, 7, 6, 8, 40], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]),
    ([9, 30, 31, 7, 2, 1, 4, 50], [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0]),
    ([7, 5, 22, 7, 6, 32, 7, 2], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0])]),
  # Pieces of 9, 5, 9 and 3 tokens (overlapping by one): the last joins the second bin.
  ("first_fit", [
    ([1, 5, 20, 21, 7, 6, 8, 40], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]),
    ([9, 30, 31, 7, 2, 32, 7, 2], [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 1, 0, 0]),
    ([1, 4, 50, 7, 5, 22, 7, 6], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1])]),
])
def test_chat_loss_mask_by_hand(packing, expected):
  windows = _packed(CHATS, seq_len=8, packing=packing)
  got = [(w["inputs"].tolist(), w["segment_ids"].tolist(), w["loss_mask"].tolist())
         for w in windows]
  assert got == expected
  assert sum(w["loss_mask"].sum() for w in windows) == 8  # each assistant token a target once


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_chat_sample_trains_on_the_assistants_tokens_only(sample_dir, tok, packing):
  from nanollama_jax.data import CHAT_SAMPLE  # pylint: disable=g-import-not-at-top
  cfg = _data_cfg(sample_dir, eval_files=str(CHAT_SAMPLE / "validation.jsonl"), format="chat",
                  packing=packing, seq_len=64)
  conversations = sources.documents(cfg, "eval")
  assert len(conversations) == 50
  batches = pipeline.eval_batches(cfg, tok, max_batches=1000)
  mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
  targets = np.concatenate([b["targets"].ravel() for b in batches])
  assert mask.sum() == assistant_tokens(tok, conversations) == 10601
  # Trained targets are the assistant's: never BOS, EOS or a system/user/assistant marker.
  assert not set(targets[mask > 0].tolist()) & {1, 2, 3, 4, 5, 6}
  assert (targets[mask > 0] == 7).sum() == 52  # one <|end|> per assistant turn
  assert (targets[mask > 0] == 8).sum() == (targets[mask > 0] == 9).sum() == 13
  inputs = np.concatenate([b["inputs"].ravel() for b in batches])
  positions = np.concatenate([b["positions"].ravel() for b in batches])
  assert (positions[inputs == tok.bos_id] == 0).all()


CHAT_OK = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("record, error", [
  ({"messages": [{"role": "human", "content": "Hi"}]},
   r"line 2, message 1: role 'human'; allowed: system, user, assistant"),
  ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
   r"line 2, message 2: 'content' is missing"),
  ({"messages": [{"role": "user", "content": None}]}, r"line 2, message 1: 'content' is missing"),
  ({"messages": [{"role": "user", "content": ["Hi"]}]},
   r"line 2, message 1: 'content' is a list, not a string"),
  ({"messages": [{"role": "user", "content": "Hi", "reasoning_content": "hm"}]},
   r"line 2, message 1: 'reasoning_content' \(str\) in a turn of the user; it must be a string "
   r"in an assistant turn"),
  ({"messages": [{"role": "assistant", "content": "Hi", "reasoning_content": 3}]},
   r"line 2, message 1: 'reasoning_content' \(int\) in a turn of the assistant"),
  ({"messages": "Hi"}, r"line 2: field 'messages' is a str, not a list of messages"),
  ({"messages": ["Hi"]}, r"line 2, message 1: a str, not an object with 'role' and 'content'"),
  ({"text": "Hi"},
   r"line 2: no field 'messages' \(data.format='chat'\); the record has \['text'\]"),
])
def test_bad_chat_records_are_errors_naming_file_line_and_turn(sample_dir, tok, tmp_path, record,
                                                               error):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(CHAT_OK) + "\n" + json.dumps(record) + "\n")
  cfg = _data_cfg(sample_dir, eval_files=str(path), format="chat")
  with pytest.raises(ValueError, match=r"chat.jsonl, " + error):
    pipeline.eval_batches(cfg, tok, max_batches=10)


def test_empty_and_assistantless_conversations_are_skipped_and_counted(sample_dir, tok, tmp_path,
                                                                       caplog):
  rows = [CHAT_OK, {"messages": []}, {"messages": None},
             {"messages": [{"role": "user", "content": "Hi"}]}, CHAT_OK]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _data_cfg(sample_dir, eval_files=str(path), format="chat")
  with caplog.at_level("WARNING"):
    batches = pipeline.eval_batches(cfg, tok, max_batches=10)
  assert "chat.jsonl: skipped 1 conversations without an assistant turn, 2 empty documents" in (
    caplog.text)
  assert sum(b["loss_mask"].sum() for b in batches) == 2 * (len(tok.encode("Hello")) + 1)


def test_chat_refuses_text_files_pretokenized_data_and_old_tokenizers(sample_dir, tok, tmp_path):
  from helpers import train_pre_chat_tokenizer  # pylint: disable=g-import-not-at-top
  from nanollama_jax.data import CHAT_SAMPLE  # pylint: disable=g-import-not-at-top
  (tmp_path / "a.txt").write_text("Hi\n")
  cfg = _data_cfg(sample_dir, eval_files=str(tmp_path / "a.txt"), format="chat")
  with pytest.raises(ValueError, match=r"a.txt: data.format='chat' reads conversations from JSON"):
    pipeline.eval_batches(cfg, tok, max_batches=1)
  _prepare(sample_dir / "validation.jsonl", tok, tmp_path / "val_tokens")
  cfg.eval_files = str(tmp_path / "val_tokens")
  with pytest.raises(errors.ConfigError, match="val_tokens is a pretokenized dataset, which holds"):
    pipeline.eval_batches(cfg, tok, max_batches=1)
  old = load_tokenizer(str(train_pre_chat_tokenizer(
    sources.documents(_data_cfg(sample_dir), "eval"), 400, tmp_path / "old.model")))
  cfg.eval_files = str(CHAT_SAMPLE / "validation.jsonl")
  with pytest.raises(ValueError, match=r"old.model \(400 ids\) has no chat template and not "):
    pipeline.eval_batches(cfg, old, max_batches=1)


@pytest.mark.parametrize("streaming", [True, False])
def test_chat_from_the_hub(sample_dir, tok, tmp_path, monkeypatch, streaming):
  from nanollama_jax.data import CHAT_SAMPLE  # pylint: disable=g-import-not-at-top
  files = str(CHAT_SAMPLE / "validation.jsonl")
  cfg = _hub_cfg(sample_dir, tmp_path, monkeypatch, format="chat", hf_streaming=streaming)
  cfg.hf_data_files = files
  local = sources.documents(_data_cfg(sample_dir, eval_files=files, format="chat"), "eval")
  found = sources.open_split(cfg, "eval")
  docs = [doc for doc, _ in found.stream] if streaming else list(found.docs)
  assert docs == local and len(docs) == 50
  assert sum(b["loss_mask"].sum() for b in pipeline.eval_batches(cfg, tok, 1000)) == (
    assistant_tokens(tok, local))


def test_chat_from_parquet_equals_json_lines(sample_dir, tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from nanollama_jax.data import CHAT_SAMPLE  # pylint: disable=g-import-not-at-top

  path = CHAT_SAMPLE / "validation.jsonl"
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
  from_json = list(records.read_files([str(path)], "text", doc_format="chat"))
  assert list(records.read_files([str(tmp_path / "chat.parquet")], "text",
                                 doc_format="chat")) == from_json
  bad = pa.table({"messages": [[{"role": "bot", "content": "x"}]]})
  pq.write_table(bad, tmp_path / "b.parquet")
  with pytest.raises(ValueError, match=r"b.parquet, row 1, message 1: role 'bot'"):
    list(records.read_files([str(tmp_path / "b.parquet")], "text", doc_format="chat"))

"""Tests of the tokenizer: ids, round trips, training, the workdir copy, the script."""

import json
import os
import pickle
import shutil

import pytest

from helpers import run_script, train_pre_chat_tokenizer
from nanollama_jax import config
from nanollama_jax.data import chat, records
from nanollama_jax.data import spm_tokenizer as tokenizer
from nanollama_jax.data.spm_tokenizer import train_tokenizer
from nanollama_jax.data.tokenizer_source import load as load_tokenizer
from nanollama_jax.data.tokenizer_source import load_or_train_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return load_tokenizer(str(tokenizer_path))


def _sample_docs(sample_dir):
  files = [str(sample_dir / "train.jsonl"), str(sample_dir / "validation.jsonl")]
  return list(records.read_files(files, "text"))


def test_special_ids_and_exact_vocab_size(tok):
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 512


def test_chat_tokens_are_control_symbols_at_fixed_ids(tok):
  assert tokenizer.CHAT_TOKENS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                   "<think>", "</think>")
  ids = (tokenizer.SYSTEM_ID, tokenizer.USER_ID, tokenizer.ASSISTANT_ID, tokenizer.END_OF_TURN_ID,
         tokenizer.THINK_ID, tokenizer.END_THINK_ID)
  assert ids == (4, 5, 6, 7, 8, 9)
  sp = tok._sp  # pylint: disable=protected-access
  assert [sp.id_to_piece(i) for i in ids] == list(tokenizer.CHAT_TOKENS)
  assert all(sp.is_control(i) for i in ids)
  assert tok.has_chat_tokens
  assert tok.decode([1, 4, 5, 6, 7, 8, 9, 2]) == ""


def test_no_text_encodes_to_a_special_token(tok, sample_dir):
  markers = "".join(tokenizer.CHAT_TOKENS) + "<s></s><pad><unk>"
  texts = _sample_docs(sample_dir) + [markers, " ".join(tokenizer.CHAT_TOKENS), "<|user|>Hi<|end|>",
                                      "<think>\nhm\n</think>", "<|", "|>", "<", ">"]
  special = set(range(10))  # unk, bos, eos, pad and the chat tokens
  for text in texts:
    ids = tok.encode(text)
    assert not special & set(ids), text
    assert tok.decode(ids) == text


def test_a_tokenizer_without_chat_tokens_is_recognised(sample_dir, tmp_path):
  path = train_pre_chat_tokenizer(_sample_docs(sample_dir)[:200], 400, tmp_path / "old.model")
  old = load_tokenizer(str(path))
  assert old.vocab_size == 400 and not old.has_chat_tokens
  with pytest.raises(ValueError, match=r"old.model \(400 ids\) has no chat template and not "
                     r"this project's chat tokens \(<\|system\|> .*\): data.format='chat' needs "
                     r"one or the other"):
    chat.formatter(old)


def test_round_trip_of_every_sample_document(tok, sample_dir):
  docs = _sample_docs(sample_dir)
  assert len(docs) == 1254
  assert sum("\n" in d for d in docs) > 100
  assert [d for d in docs if tok.decode(tok.encode(d)) != d] == []


def test_newlines_digits_and_no_bos_eos(tok):
  # Byte fallback: <0x0A> follows the 4 specials, the 6 chat tokens and 0x00..0x09.
  assert tok.encode("\n") == [20]
  ids = tok.encode("In 2024\n\nthe end")
  assert tok.decode(ids) == "In 2024\n\nthe end"
  digits = tok.encode("2024")
  assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "In 2024\n\nthe end"


def test_pickles_without_its_file(tok, tmp_path):
  path = tmp_path / "copy.model"
  shutil.copyfile(tok.source, path)
  copy = load_tokenizer(str(path))
  path.unlink()
  restored = pickle.loads(pickle.dumps(copy))
  assert restored.encode("Once upon a time\n") == tok.encode("Once upon a time\n")
  assert restored.vocab_size == 512


def test_train_writes_only_the_model(sample_dir, tmp_path):
  docs = _sample_docs(sample_dir)[:200]
  out = tmp_path / "tok.model"
  tok = train_tokenizer(docs, 400, str(out))
  assert tok.vocab_size == 400
  assert os.listdir(tmp_path) == ["tok.model"]


def test_too_few_texts_for_the_vocab_size(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size=512 on 2 lines .*<= \d+"):
    train_tokenizer(["hello world", "a tiny corpus"], 512, str(tmp_path / "t.model"))
  with pytest.raises(ValueError, match="vocab_size=512 on 0 lines"):
    train_tokenizer([], 512, str(tmp_path / "t.model"))
  assert not (tmp_path / "t.model").exists()


def test_not_a_model_file(tmp_path):
  path = tmp_path / "bad.model"
  path.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model: not a sentencepiece model"):
    load_tokenizer(str(path))


def _data_cfg(sample_dir, **fields):
  cfg = config.get_default_config().data
  cfg.train_files = str(sample_dir / "train.jsonl")
  cfg.update(fields)
  return cfg


def test_load_or_train_trains_once_then_reuses(sample_dir, tmp_path):
  cfg = _data_cfg(sample_dir, tokenizer_train_docs=200)
  tok = load_or_train_tokenizer(cfg, 400, str(tmp_path))
  assert tok.vocab_size == 400 and tok.has_chat_tokens
  saved = (tmp_path / "tokenizer.model").read_bytes()
  assert saved == tok.proto
  again = load_or_train_tokenizer(cfg, 999, str(tmp_path))  # reused: the vocab size is not read
  assert again.vocab_size == 400
  assert (tmp_path / "tokenizer.model").read_bytes() == saved


def test_load_or_train_copies_a_given_tokenizer(sample_dir, tokenizer_path, tmp_path):
  cfg = _data_cfg(sample_dir, tokenizer=str(tokenizer_path))
  tok = load_or_train_tokenizer(cfg, 400, str(tmp_path / "run"))
  assert tok.vocab_size == 512
  assert (tmp_path / "run" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
  assert load_or_train_tokenizer(cfg, 400, str(tmp_path / "run")).vocab_size == 512


def test_load_or_train_refuses_to_swap_tokenizers(sample_dir, tokenizer_path, tmp_path):
  load_or_train_tokenizer(_data_cfg(sample_dir, tokenizer_train_docs=200), 400, str(tmp_path))
  cfg = _data_cfg(sample_dir, tokenizer=str(tokenizer_path))
  with pytest.raises(ValueError, match="data.tokenizer=.* differs from the tokenizer this "
                     "workdir was started with"):
    load_or_train_tokenizer(cfg, 400, str(tmp_path))


def test_train_tokenizer_script_json(sample_dir, tmp_path):
  out = tmp_path / "tok.model"
  result = run_script("train_tokenizer.py", "--input", str(sample_dir / "*.jsonl"),
                      "--vocab-size", "512", "--out", str(out), "--max-docs", "300", "--json",
                      cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  tok = load_tokenizer(str(out))
  assert summary["vocab_size"] == tok.vocab_size == 512
  assert summary["documents"] == 300
  assert summary["sample"] == "One day, a little girl named Lily found a needle in her room"
  assert summary["sample_tokens"] == len(tok.encode(summary["sample"]))
  assert 2.0 < summary["chars_per_token"] < 2.5

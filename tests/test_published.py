"""Published tokenizers: Mistral's sentencepiece models (v1, v3) and a Llama-3-style tokenizer.json,
read from every kind of source, with their own special tokens, pad policy and vocabulary checks;
their chat templates against transformers' apply_chat_template; their export to tokenizer.json."""

import json
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from helpers import LLAMA3_SPECIALS, REPO, cpu_env, free_port, model_cfg, random_params
from nanollama_jax import config, errors, export, recipe
from nanollama_jax.data import CHAT_SAMPLE, chat, records, tokenizer_source
from nanollama_jax.data.hf_tokenizer import HFTokenizer
from nanollama_jax.data.spm_tokenizer import SentencePieceTokenizer

# The text the exported tokenizers are held to: leading and repeated spaces, several newlines,
# digits, accents, emoji, tabs and code.
TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  " leading space", "  two leading spaces", "trailing space ", "a  b   c    d",
  "Digits 0123456789 and 3.14159, 2024-11-22",
  "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語, 한국어",
  "emoji 🙂🚀👍🏽 and symbols ©®™ ∑∫√", "new\nlines\n\nand\ttabs", "\n\n  x\n\n\n", "", " ", "\n",
  "    def f(x):\n        return x  # code\n",
]


def _sample_texts(sample_dir, n=200):
  return [json.loads(line)["text"] for line in open(sample_dir / "validation.jsonl")][:n]


@pytest.fixture(scope="module")
def v1(mistral_v1):
  return tokenizer_source.load(str(mistral_v1))


@pytest.fixture(scope="module")
def v3(mistral_v3):
  return tokenizer_source.load(str(mistral_v3))


@pytest.fixture(scope="module")
def l3(llama3_style):
  return tokenizer_source.load(str(llama3_style))


def test_published_sentencepiece_models_keep_their_own_ids(v1, v3, mistral_v3):
  assert isinstance(v3, SentencePieceTokenizer) and v3.source == str(mistral_v3)
  assert (v1.vocab_size, v1.bos_id, v1.eos_id) == (32000, 1, 2)
  assert (v3.vocab_size, v3.bos_id, v3.eos_id) == (32768, 1, 2)
  # Neither has a pad token: padding is EOS, a valid id.
  assert not v1.has_pad and v1.pad_id == v1.eos_id == 2
  assert v3.pad_id == 2
  # The dummy prefix: a text starts with "▁", and decoding gives the text back.
  assert [v1.piece(i) for i in v1.encode("Hello world")] == ["▁Hello", "▁world"]
  for text in TEXTS:
    assert v1.decode(v1.encode(text)) == text and v3.decode(v3.encode(text)) == text


def test_special_token_strings_in_text_are_text(v3, l3, llama3_style):
  ids = v3.encode("[INST] Hi [/INST]</s><s>")
  assert not {1, 2, 3, 4} & set(ids) and v3.decode(ids) == "[INST] Hi [/INST]</s><s>"
  text = "a<|eot_id|>b <|begin_of_text|><|start_header_id|>"
  ids = l3.encode(text)
  special = {l3.token_id(t) for t in LLAMA3_SPECIALS}
  assert not special & set(ids) and l3.decode(ids) == text
  # transformers matches them by default; split_special_tokens=True gives our ids.
  hf = transformers.AutoTokenizer.from_pretrained(str(llama3_style))
  assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids
  assert l3.token_id("<|eot_id|>") in hf(text, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_json_reads_bos_eos_and_pad_from_its_configuration(l3, llama3_style, tmp_path):
  assert isinstance(l3, HFTokenizer) and l3.vocab_size == 1024
  assert (l3.bos_id, l3.eos_id) == (l3.token_id("<|begin_of_text|>"),
                                    l3.token_id("<|end_of_text|>"))
  assert l3.pad_id == l3.eos_id  # no pad token
  assert l3.chat_template and "<|eot_id|>" in l3.chat_template
  hf = transformers.AutoTokenizer.from_pretrained(str(llama3_style))
  for text in TEXTS:
    assert l3.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert l3.decode(l3.encode(text)) == text
  assert hf("Hi")["input_ids"] == [l3.bos_id, *l3.encode("Hi")]  # BOS first, as in training
  # A pad token of its own is used; one that is not in the vocabulary is an error.
  files = l3.files
  config_json = json.loads(files["tokenizer_config.json"])
  pad = {**config_json, "pad_token": "<|finetune_right_pad_id|>"}
  files["tokenizer_config.json"] = json.dumps(pad).encode()
  assert HFTokenizer(files, "x").pad_id == l3.token_id("<|finetune_right_pad_id|>")
  files["tokenizer_config.json"] = json.dumps({**config_json, "eos_token": "<nope>"}).encode()
  with pytest.raises(errors.DataError,
                     match=r"x: eos_token='<nope>' is not a token of tokenizer.json"):
    HFTokenizer(files, "x")
  # Without a BOS token, documents start with EOS (GPT-2's and Qwen's convention).
  files["tokenizer_config.json"] = json.dumps({"eos_token": "<|end_of_text|>"}).encode()
  assert HFTokenizer(files, "x").bos_id == l3.eos_id


def test_every_source_of_a_tokenizer(mistral_v3, llama3_style, tmp_path, l3):
  # A directory with both: tokenizer.json is read, as transformers' AutoTokenizer does.
  both = tmp_path / "both"
  both.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (both / name).write_bytes((llama3_style / name).read_bytes())
  (both / "tokenizer.model").write_bytes(mistral_v3.read_bytes())
  assert tokenizer_source.load(str(both)).kind == "tokenizer.json"
  # The tokenizer.json file itself: its configuration beside it is read too.
  direct = tokenizer_source.load(str(llama3_style / "tokenizer.json"))
  assert direct.files == l3.files and direct.bos_id == l3.bos_id
  # A directory with only a sentencepiece model, under its published name.
  only = tmp_path / "only"
  only.mkdir()
  (only / "tokenizer.model").write_bytes(mistral_v3.read_bytes())
  assert tokenizer_source.load(str(only)).vocab_size == 32768
  # Errors: one line each.
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "README.md").write_text("hi")
  with pytest.raises(errors.DataError, match=r"data.tokenizer='.*empty': the directory holds no "
                     r"tokenizer \(tokenizer.json or tokenizer.model\); files there: README.md"):
    tokenizer_source.load(str(tmp_path / "empty"))
  with pytest.raises(errors.DataError, match="no such file or directory"):
    tokenizer_source.load(str(tmp_path / "nothing"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(errors.DataError, match="bad.json: not a Hugging Face tokenizer.json"):
    tokenizer_source.load(str(tmp_path / "bad.json"))
  with pytest.raises(errors.ConfigError, match="a Hub name is hf:ORG/NAME or hf:ORG/NAME@REVISION"):
    tokenizer_source.load("hf:no-slash")


def test_tokenizers_pickle_as_their_bytes(l3, v3):
  for tok in (l3, v3):
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.files == tok.files and copy.encode("Once upon a time 🙂") == tok.encode(
      "Once upon a time 🙂")
    assert (copy.bos_id, copy.eos_id, copy.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_an_unreachable_hub_is_one_line_within_seconds(monkeypatch):
  from huggingface_hub import constants
  free_port_url = f"http://127.0.0.1:{free_port()}"
  monkeypatch.setattr(constants, "ENDPOINT", free_port_url)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  start = time.perf_counter()
  with pytest.raises(errors.NetworkError) as caught:
    tokenizer_source.load("hf:meta-llama/Llama-3.2-1B")
  assert time.perf_counter() - start < 10
  message = str(caught.value)
  assert message.startswith(f"cannot reach the Hugging Face Hub at {free_port_url} to read "
                            "data.tokenizer='hf:meta-llama/Llama-3.2-1B'")
  assert "scripts/train_tokenizer.py" in message and "\n" not in message
  # Offline mode reads only the cache, where it is not.
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(errors.NetworkError, match="not in the local cache"):
    tokenizer_source.load("hf:meta-llama/Llama-3.2-1B@main")


def test_the_vocabulary_is_checked_against_the_model(v3, caplog):
  small = model_cfg(vocab_size=32000)
  with pytest.raises(errors.ConfigError, match=r"model.vocab_size=32000 is smaller than the "
                     r"vocabulary of sentencepiece tokenizer .* \(32,768 ids\): set "
                     r"model.vocab_size to at least 32768"):
    tokenizer_source.check_vocab(v3, small)
  with caplog.at_level("INFO"):
    tokenizer_source.check_vocab(v3, model_cfg(vocab_size=32896))
  assert "128 embedding rows beyond the tokenizer's 32768 ids are never used" in caplog.text


def test_the_workdir_keeps_the_files_and_refuses_another_tokenizer(sample_dir, llama3_style,
                                                                   mistral_v1, tmp_path):
  cfg = config.get_default_config().data
  cfg.update(train_files=str(sample_dir / "train.jsonl"), tokenizer=str(llama3_style))
  tok = tokenizer_source.load_or_train_tokenizer(cfg, 1024, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer.json",
                                                                   "tokenizer_config.json"]
  assert tokenizer_source.workdir_tokenizer(str(tmp_path / "run")).files == tok.files
  cfg.tokenizer = str(mistral_v1)
  with pytest.raises(errors.DataError, match=r"differs from the tokenizer this workdir was "
                     r"started with \(tokenizer.json, in"):
    tokenizer_source.load_or_train_tokenizer(cfg, 1024, str(tmp_path / "run"))


# --- Chat templates ----------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a storyteller."}
CHATS = [
  [{"role": "user", "content": "Tell me a story about a cat."},
   {"role": "assistant", "content": "Once upon a time, there was a cat named Tom."}],
  [SYSTEM, {"role": "user", "content": "  A story, please!\n"},
   {"role": "assistant", "content": "Lily had a red ball.\nShe played all day."},
   {"role": "user", "content": "Ünïcödé: café, 日本語 🙂"},
   {"role": "assistant", "content": "  ok  "}],
]


def _conversation(messages):
  return tuple(records.Message(m["role"], m["content"], m.get("reasoning_content", ""))
               for m in messages)


def _ids(encoded):
  return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def test_a_chat_template_gives_apply_chat_template_ids(l3, llama3_style):
  hf = transformers.AutoTokenizer.from_pretrained(str(llama3_style))
  fmt = chat.formatter(l3)
  assert isinstance(fmt, chat.Template)
  sample = [json.loads(line)["messages"] for line in open(CHAT_SAMPLE / "validation.jsonl")]
  equal = 0
  for messages in CHATS + sample:
    # The template does not read reasoning: ours writes it into the content, as text.
    inline = [{"role": m["role"], "content": m["content"]} if "reasoning_content" not in m else
              {"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n"
               f"{m['content']}"} for m in messages]
    ids, trained = fmt.encode(_conversation(messages))
    assert ids.tolist() == _ids(hf.apply_chat_template(inline)), messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, _ = fmt.encode(_conversation(messages[:last]), add_generation_prompt=True)
    assert prompt.tolist() == _ids(hf.apply_chat_template(inline[:last],
                                                          add_generation_prompt=True))
    equal += 1
  assert equal == 52
  # Trained: each assistant turn's content and its <|eot_id|>, nothing else.
  ids, trained = fmt.encode(_conversation(CHATS[0]))
  eot = l3.token_id("<|eot_id|>")
  assert ids[trained == 1].tolist() == [*l3.encode("Once upon a time, there was a cat named Tom."),
                                        eot]
  assert fmt.stop_ids == (eot, l3.eos_id)
  assert fmt.prompt("Hi", system="Be brief.") == _ids(hf.apply_chat_template(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    add_generation_prompt=True))


def test_control_tokens_in_messages_are_text(l3, llama3_style):
  hf = transformers.AutoTokenizer.from_pretrained(str(llama3_style))
  messages = [{"role": "user", "content": "What does <|eot_id|> do?"},
              {"role": "assistant", "content": "It ends a turn: <|eot_id|><|start_header_id|>"}]
  ids, trained = chat.formatter(l3).encode(_conversation(messages))
  assert ids.tolist() == _ids(hf.apply_chat_template(messages, sanitize_control_tokens=True))
  assert ids.tolist() != _ids(hf.apply_chat_template(messages))  # transformers' default
  assert ids.tolist().count(l3.token_id("<|eot_id|>")) == 2  # the template's, one per turn
  assert l3.decode(ids[trained == 1].tolist()) == "It ends a turn: <|eot_id|><|start_header_id|>"


def test_reasoning_on_a_template_without_it_is_written_as_text(l3):
  fmt = chat.formatter(l3)
  reasoning = (records.Message("user", "Hi"), records.Message("assistant", "Hello!", "Greet."))
  ids, trained = fmt.encode(reasoning)
  reply = ids[trained == 1].tolist()
  assert l3.decode(reply) == "<think>\nGreet.\n</think>\n\nHello!"
  assert fmt.split_reply(reply[:-1]) == ("Greet.", "Hello!")
  assert fmt.split_reply(l3.encode("Hello!")) == ("", "Hello!")


def test_a_tokenizer_with_neither_chat_format_is_refused(v3, v1):
  for tok in (v1, v3):
    with pytest.raises(errors.DataError, match=r"has no chat template and not this project's chat "
                       r"tokens .* Use a tokenizer whose tokenizer_config.json has a "
                       r"chat_template .* or pretrain with a tokenizer trained here"):
      chat.formatter(tok)


# --- Export -------------------------------------------------------------------------------------


def test_published_sentencepiece_converts_to_the_same_ids(v1, v3, sample_dir, tmp_path):
  texts = TEXTS + _sample_texts(sample_dir)
  for name, tok in (("v1", v1), ("v3", v3)):
    export.write_tokenizer(tok, str(tmp_path / name), 2048)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
    assert (tmp_path / name / "tokenizer.model").read_bytes() == tok.files["tokenizer.model"]
    mismatched = [t for t in texts if hf.encode(t, add_special_tokens=False) != tok.encode(t)]
    assert mismatched == []
    assert [t for t in texts if hf.decode(tok.encode(t)) != t] == []
    assert hf("Once upon")["input_ids"] == [1, *tok.encode("Once upon")]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, None)
    assert hf.vocab_size == tok.vocab_size


def test_a_tokenizer_json_is_exported_as_its_own_files(l3, llama3_style, tmp_path):
  cfg = model_cfg(vocab_size=1024)
  params = random_params(cfg)
  export.save_hf(str(tmp_path / "hf"), params, cfg, l3)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / name).read_bytes() == (llama3_style / name).read_bytes()
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
    l3.bos_id, l3.eos_id, l3.eos_id)


def test_an_export_that_fails_leaves_nothing(l3, tmp_path, monkeypatch):
  cfg = model_cfg(vocab_size=1024)
  params = random_params(cfg)

  def broken(*args):
    raise OSError("disk full")
  monkeypatch.setattr(export, "write_tokenizer", broken)
  with pytest.raises(OSError, match="disk full"):
    export.save_hf(str(tmp_path / "out"), params, cfg, l3)
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "a_file").write_text("")
  with pytest.raises(errors.ExportError, match="a_file is a file: name the directory to write"):
    export.save_hf(str(tmp_path / "a_file"), params, cfg)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("")
  with pytest.raises(errors.ExportError, match="holds other files than a model's"):
    export.save_hf(str(tmp_path / "notes"), params, cfg)
  monkeypatch.undo()
  export.save_hf(str(tmp_path / "out"), params, cfg, l3)
  export.save_hf(str(tmp_path / "out"), params, cfg, l3)  # an earlier export is replaced
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "notes", "out"]
  written = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert np.array_equal(written["model.norm.weight"], params["final_norm"]["scale"])


# --- Recipes ------------------------------------------------------------------------------------

RECIPES = {"llama3_2_1b": "hf:meta-llama/Llama-3.2-1B",
           "llama3_1_8b": "hf:meta-llama/Llama-3.1-8B",
           "tinyllama_1b": "hf:TinyLlama/TinyLlama_v1.1",
           "dense_180m": "hf:mistralai/Mistral-7B-v0.3"}


def test_the_published_recipes_use_the_published_tokenizers_and_say_what_to_do_offline(
    monkeypatch, tmp_path):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  for name, spec in RECIPES.items():
    cfg = recipe.load(f"configs/{name}.py")
    assert cfg.data.tokenizer == spec
    start = time.perf_counter()
    with pytest.raises(errors.NetworkError) as caught:
      tokenizer_source.load_or_train_tokenizer(cfg.data, cfg.model.vocab_size,
                                               str(tmp_path / name))
    assert time.perf_counter() - start < 10
    assert f"data.tokenizer='{spec}'" in str(caught.value)
    command = f"--input 'YOUR_TEXT/*.jsonl' --vocab-size {cfg.model.vocab_size} --out"
    assert f"python scripts/train_tokenizer.py {command}" in str(caught.value)
    assert not (tmp_path / name).exists()
  # The TinyStories recipes keep training their own.
  assert recipe.load("configs/tinystories.py").data.tokenizer == ""


@pytest.mark.slow
def test_an_offline_published_recipe_stops_in_one_line(tmp_path):
  env = {**cpu_env(1), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "nanollama_jax.train", "--config",
                         "configs/dense_180m.py", "--workdir", str(tmp_path / "run")],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 75, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("network error: cannot reach the Hugging Face Hub at ")
  assert "data.tokenizer='hf:mistralai/Mistral-7B-v0.3'" in last and "train_tokenizer.py" in last
  assert not (tmp_path / "run").exists()
  print(f"stopped after {time.perf_counter() - start:.1f}s")

"""Runs with the tokenizers and weights users bring: Mistral v1, Mistral v3 and a Llama-3-style
tokenizer.json train, evaluate, sample and export (checked in transformers); a chat run on a
tokenizer's own template; continued pretraining from a Hugging Face directory, against
transformers' loss and greedy decoding."""

import contextlib
import io
import json
import math
import os
import runpy
import shutil

import numpy as np
import pytest
import torch
import transformers

from helpers import REPO
from nanollama_jax import config, errors, hf_files, train
from nanollama_jax.data import CHAT_SAMPLE, chat, pipeline, sources, tokenizer_source

torch.set_num_threads(2)

TEXTS = ["Once upon a time, there was a little girl named Lily.", "  two leading spaces",
         "a  b   c    d", "Digits 0123456789, 2024-11-22", "Ünïcödé: café, Straße, 日本語",
         "emoji 🙂🚀👍🏽", "new\nlines\n\nand\ttabs", "", " ", "\n"]
PROMPT = "Once upon a time"


class _Done:
  """What a script printed and returned."""

  def __init__(self, returncode, stdout, stderr):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(name, *args, cwd):
  """scripts/<name> with `args`, in this process (its start-up is most of a script's time here),
  relative paths from `cwd`: the exit code and what it printed."""
  main = runpy.run_path(os.path.join(REPO, "scripts", name))["main"]
  out, err = io.StringIO(), io.StringIO()
  here = os.getcwd()
  os.chdir(cwd)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = _exit_code(main, list(args))
  finally:
    os.chdir(here)
  return _Done(code, out.getvalue(), err.getvalue())


def _exit_code(main, argv):
  try:
    errors.cli(lambda: main(argv))
  except SystemExit as e:
    return e.code
  return 0


def _config(sample_dir, tokenizer: str, vocab_size: int, **train_fields):
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=160, max_seq_len=128))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"),
                       eval_files=str(sample_dir / "validation.jsonl"), tokenizer=tokenizer,
                       seq_len=64, batch_size=16))
  cfg.optim.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=5))
  cfg.train.update(dict(steps=30, log_every=10, eval_every=30, eval_steps=4, ckpt_every=30))
  cfg.train.update(train_fields)
  return cfg


def _greedy_in_transformers(out_dir, prompt: str, new_tokens: int) -> str:
  """The prompt and transformers' greedy continuation of it, decoded whole."""
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  with torch.no_grad():
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=hf.config.pad_token_id)
  return tok.decode(out[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mistral_v1", "mistral_v3", "llama3_style"])
def test_a_published_tokenizer_trains_evaluates_samples_and_exports(which, request, sample_dir,
                                                                    tmp_path):
  source = request.getfixturevalue(which)
  tok = tokenizer_source.load(str(source))
  cfg = _config(sample_dir, str(source), tok.vocab_size)
  if tok.vocab_size > 4096:  # Mistral's 32k rows: fewer, smaller steps learn enough, faster
    cfg.data.batch_size, cfg.train.steps, cfg.train.eval_every, cfg.train.ckpt_every = 8, 20, 20, 20
  _, last = train.train(cfg, str(tmp_path / "run"))
  assert last["eval_loss"] < math.log(tok.vocab_size) - 1.0, last  # it learnt
  assert tokenizer_source.workdir_tokenizer(str(tmp_path / "run")).files == tok.files

  ppl = run_script("eval_perplexity.py", "--workdir", "run", "--max-batches", "4", "--json",
                   cwd=tmp_path)
  assert ppl.returncode == 0, ppl.stderr[-2000:]
  result = json.loads(ppl.stdout)
  assert result["tokens"] == last["eval_tokens"]
  assert result["loss"] == pytest.approx(last["eval_loss"], abs=1e-4)

  ours = run_script("generate.py", "--workdir", "run", "--prompt", PROMPT, "--temperature", "0",
                    "--max-new-tokens", "20", "--json", cwd=tmp_path)
  assert ours.returncode == 0, ours.stderr[-2000:]
  completion = json.loads(ours.stdout)["completions"][0]
  assert completion.startswith(PROMPT) and len(completion) > len(PROMPT) + 10

  exported = run_script("export_to_pytorch.py", "--workdir", "run", "--out", "hf", cwd=tmp_path)
  assert exported.returncode == 0, exported.stderr[-2000:]
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  texts = TEXTS + [json.loads(line)["text"] for line in open(sample_dir / "validation.jsonl")][:50]
  assert [t for t in texts if hf_tok.encode(t, add_special_tokens=False) != tok.encode(t)] == []
  saved = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert saved["pad_token_id"] == tok.pad_id == tok.eos_id
  # transformers' greedy continuation of the export is ours (a new token may stop at EOS).
  theirs = _greedy_in_transformers(tmp_path / "hf", PROMPT, json.loads(ours.stdout)[
    "new_tokens"][0])
  assert theirs == completion


@pytest.mark.slow
def test_a_chat_run_on_a_tokenizers_own_template(sample_dir, llama3_style, tmp_path):
  tok = tokenizer_source.load(str(llama3_style))
  fmt = chat.formatter(tok)
  cfg = _config(sample_dir, str(llama3_style), tok.vocab_size, steps=12, eval_every=12,
                eval_steps=100, ckpt_every=0, sample_prompts="Tell me a story.", sample_tokens=8)
  cfg.data.update(format="chat", train_files=str(CHAT_SAMPLE / "train.jsonl"),
                  eval_files=str(CHAT_SAMPLE / "validation.jsonl"))
  _, last = train.train(cfg, str(tmp_path / "chat"))
  conversations = sources.documents(cfg.data, "eval")
  trained = sum(int(fmt.encode(c)[1].sum()) for c in conversations)
  assert last["eval_tokens"] == trained > 5000
  batches = pipeline.eval_batches(cfg.data, tok, 100)
  targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
  # The assistant's tokens end each turn with <|eot_id|>; the headers are never trained.
  assert (targets == tok.token_id("<|eot_id|>")).sum() == sum(
    m.role == "assistant" for c in conversations for m in c)
  assert not (targets == tok.token_id("<|start_header_id|>")).any()

  out = run_script("generate.py", "--workdir", "chat", "--chat", "--prompt", "Tell me a story.",
                   "--temperature", "0", "--max-new-tokens", "12", "--json", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(json.loads(out.stdout)["replies"]) == 1
  exported = run_script("export_to_pytorch.py", "--workdir", "chat", "--out", "hf",
                        cwd=tmp_path)
  assert exported.returncode == 0, exported.stderr[-2000:]
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  messages = [{"role": "user", "content": "Tell me a story."}]
  assert list(hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]) == (
    fmt.prompt("Tell me a story."))


def _hf_loss(model, batch) -> float:
  """transformers' token-weighted loss on one of our packed batches: each document piece of a
  row run on its own, from position 0, as our segment ids and positions say."""
  total, count = 0.0, 0.0
  for b in range(batch["inputs"].shape[0]):
    segments = batch["segment_ids"][b]
    for s in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == s)
      inputs = torch.from_numpy(batch["inputs"][b, where].astype(np.int64))[None]
      with torch.no_grad():
        logits = model(inputs).logits[0].double()
      targets = torch.from_numpy(batch["targets"][b, where].astype(np.int64))
      mask = torch.from_numpy(batch["loss_mask"][b, where]).double()
      ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
      total += float((ce * mask).sum())
      count += float(mask.sum())
  return total / count


@pytest.mark.slow
def test_continued_pretraining_from_a_hugging_face_directory(sample_dir, llama3_style, tmp_path,
                                                             monkeypatch):
  tok = tokenizer_source.load(str(llama3_style))
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
    vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_id,
    eos_token_id=tok.eos_id)
  published = transformers.LlamaForCausalLM(hf_cfg).eval()
  pretrained = tmp_path / "published"
  published.save_pretrained(str(pretrained))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(llama3_style / name, pretrained / name)
  # The Hub, played by that directory: hf:ORG/NAME is downloaded once, then no more.
  downloads = []

  def download(spec, patterns, key, hint):
    if not pretrained.exists():
      raise errors.NetworkError(f"{key}={spec!r}: the Hub cannot be reached. {hint}")
    downloads.append(spec)
    return str(pretrained)
  monkeypatch.setattr(hf_files, "download", download)

  # The recipe's shape (vocabulary 4096, dim 64) is replaced by the published one, and its
  # tokenizer comes along.
  cfg = _config(sample_dir, "", 4096, steps=10, log_every=1, eval_every=10, ckpt_every=10,
                init_from="hf:tests/tiny-llama-continued")
  cfg.optim.update(lr=1e-3, warmup_steps=2)
  _, last = train.train(cfg, str(tmp_path / "run"))
  assert downloads == ["hf:tests/tiny-llama-continued"]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert (saved["vocab_size"], saved["dim"], saved["max_seq_len"], saved["tie_embeddings"],
          saved["rope_theta"]) == (1024, 64, 256, True, 500000.0)
  assert tokenizer_source.workdir_tokenizer(str(tmp_path / "run")).files == tok.files
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 10 and losses[-1] < losses[0]

  # The first step's loss is transformers' loss on the same batch (before any update).
  first = next(pipeline.train_batches(cfg.data, tok))
  assert losses[0] == pytest.approx(_hf_loss(published, first), abs=1e-4)

  # After export, transformers' greedy continuation is ours.
  ours = run_script("generate.py", "--workdir", "run", "--prompt", PROMPT, "--temperature", "0",
                    "--max-new-tokens", "16", "--json", cwd=tmp_path)
  assert ours.returncode == 0, ours.stderr[-2000:]
  exported = run_script("export_to_pytorch.py", "--workdir", "run", "--out", "hf", cwd=tmp_path)
  assert exported.returncode == 0, exported.stderr[-2000:]
  ours_json = json.loads(ours.stdout)
  assert _greedy_in_transformers(tmp_path / "hf", PROMPT, ours_json["new_tokens"][0]) == (
    ours_json["completions"][0])

  # Resuming (here to more steps) needs neither the weights nor the Hub: the workdir has all.
  shutil.rmtree(pretrained)
  cfg.train.steps = 12
  _, again = train.train(cfg, str(tmp_path / "run"))
  assert downloads == ["hf:tests/tiny-llama-continued"]
  assert [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
          if "loss" in r][-2:] == [11, 12]

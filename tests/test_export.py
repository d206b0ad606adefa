"""Export to Hugging Face Llama, proven with transformers: logits, tokenizer, training, decoding."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from helpers import (LLAMA31, model_cfg, our_logits, random_params, run_script,
                     train_pre_chat_tokenizer)
from nanollama_jax import config, errors, export, model, sharding
from nanollama_jax.data import CHAT_SAMPLE, chat, records
from nanollama_jax.data.spm_tokenizer import CHAT_TOKENS
from nanollama_jax.data.tokenizer_source import load as load_tokenizer
from nanollama_jax import step as step_lib

torch.set_num_threads(2)


@pytest.mark.parametrize("overrides", [
  dict(n_kv_heads=1),
  dict(n_kv_heads=2, tie_embeddings=True),
  dict(n_kv_heads=4, rope_theta=500000.0),
  dict(n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31, tie_embeddings=True),
  dict(n_kv_heads=1, rope_scaling=LLAMA31),
], ids=["mqa", "gqa-tied", "mha-theta500k", "gqa-llama31-tied", "mqa-llama31"])
@pytest.mark.slow
def test_exported_model_gives_our_logits_in_transformers(overrides, tmp_path):
  cfg = model_cfg(**overrides)
  params = random_params(cfg)
  export.save_hf(str(tmp_path), params, cfg)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  ours = our_logits(cfg, params, tokens)
  diff = float(np.abs(theirs - ours).max())
  print(f"{overrides}: max |logit difference| {diff:.2e}")
  assert diff <= 1e-4

  # Round trip: reading the directory back gives the same config and tensors.
  assert hf.config.rope_parameters["rope_type"] == ("llama3" if cfg.rope_scaling else "default")
  back_cfg, back = export.load_hf(str(tmp_path))
  from nanollama_jax import checkpoint
  assert checkpoint.shape_differences(back_cfg.to_dict(), cfg) == []
  assert back_cfg.rope_theta == cfg.rope_theta
  assert (back_cfg.rope_scaling is None) == (cfg.rope_scaling is None)
  export.save_hf(str(tmp_path / "again"), back, back_cfg)
  a = export.to_hf_tensors(params, cfg)
  b = export.to_hf_tensors(back, back_cfg)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  from safetensors.numpy import load_file
  first = load_file(str(tmp_path / export.SAFETENSORS))
  second = load_file(str(tmp_path / "again" / export.SAFETENSORS))
  assert first.keys() == second.keys()
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])


def test_qk_norm_models_are_refused(tmp_path):
  cfg = model_cfg(qk_norm=True)
  with pytest.raises(errors.ExportError, match="qk_norm=True has no Hugging Face Llama"):
    export.save_hf(str(tmp_path), random_params(cfg), cfg)


TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  " leading space", "  two leading spaces", "trailing space ", "a  b   c    d",
  "Digits 0123456789 and 3.14159, 2024-11-22",
  "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語, 한국어",
  "emoji 🙂🚀👍🏽 and symbols ©®™ ∑∫√",
  "new\nlines\n\nand\ttabs", "", " ", "\n",
]


def test_exported_tokenizer_matches_sentencepiece(tokenizer_path, sample_dir, tmp_path):
  tok = load_tokenizer(str(tokenizer_path))
  export.write_tokenizer(tok, str(tmp_path), 64)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.vocab_size == tok.vocab_size
  sample = TEXTS + [json.loads(line)["text"] for line in
                    open(sample_dir / "validation.jsonl")][:50]
  for text in sample:
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids, text
    assert hf.decode(ids) == tok.decode(ids) == text, text
  # With special tokens, BOS comes first, as in training.
  assert hf("Once upon")["input_ids"] == [tok.bos_id] + tok.encode("Once upon")
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                 tok.pad_id)


SYSTEM = {"role": "system", "content": "You are a storyteller."}
CHATS = [
  [{"role": "user", "content": "Tell me a story about a cat."},
   {"role": "assistant", "content": "Once upon a time, there was a cat named Tom."}],
  [SYSTEM, {"role": "user", "content": "A story, please!"},
   {"role": "assistant", "content": "Lily had a red ball.\nShe played all day.",
    "reasoning_content": "A short one: 2 lines."}],
  [SYSTEM, {"role": "user", "content": "Hi"},
   {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
   {"role": "user", "content": " Who is  it about?\n"},
   {"role": "assistant", "content": "It is about Tom, 3 years old 🙂."}],
  [{"role": "user", "content": "Ünïcödé: café, 日本語"}, {"role": "assistant", "content": ""},
   {"role": "user", "content": "\n\n"},
   {"role": "assistant", "content": "ok", "reasoning_content": "\t tabs and  spaces "}],
]


def _input_ids(encoded):
  """apply_chat_template's ids: transformers 5 returns a BatchEncoding, 4 a list."""
  return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def test_chat_template_gives_the_ids_of_our_format(tokenizer_path, tmp_path):
  tok = load_tokenizer(str(tokenizer_path))
  export.write_tokenizer(tok, str(tmp_path / "hf"), 1024)
  saved = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert saved["chat_template"] == chat.TEMPLATE
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert hf.convert_ids_to_tokens(list(range(4, 10))) == list(CHAT_TOKENS)
  assert set(range(1, 10)) <= set(hf.all_special_ids)
  # Conversations read as training reads them, so both sides see the same records.
  path = tmp_path / "chats.jsonl"
  sample = [json.loads(line) for line in open(CHAT_SAMPLE / "validation.jsonl", encoding="utf-8")]
  rows = [{"messages": m} for m in CHATS] + sample
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  conversations = list(records.read_files([str(path)], "text", doc_format="chat"))
  equal = prompts = 0
  for record, conversation in zip(rows, conversations, strict=True):
    messages = record["messages"]
    ours = chat.Markers(tok).encode(conversation)[0].tolist()
    assert _input_ids(hf.apply_chat_template(messages)) == ours
    equal += 1
    # The prompt for the last assistant turn: the turns before it and <|assistant|>.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ours = chat.Markers(tok).encode(conversation[:last], add_generation_prompt=True)[0].tolist()
    assert _input_ids(hf.apply_chat_template(messages[:last], add_generation_prompt=True)) == ours
    prompts += 1
  assert (equal, prompts) == (54, 54)
  # The prompt scripts/generate.py --chat builds.
  theirs = hf.apply_chat_template([SYSTEM, {"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True)
  assert _input_ids(theirs) == chat.Markers(tok).prompt("Hi", system=SYSTEM["content"])


def test_a_tokenizer_without_chat_tokens_exports_no_chat_template(sample_dir, tmp_path):
  texts = [json.loads(line)["text"] for line in open(sample_dir / "validation.jsonl")]
  old = load_tokenizer(str(train_pre_chat_tokenizer(texts, 400, tmp_path / "old.model")))
  export.write_tokenizer(old, str(tmp_path / "hf"), 64)
  assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert hf.encode("Once upon a time", add_special_tokens=False) == old.encode("Once upon a time")


@pytest.mark.slow
def test_five_training_steps_match_pytorch(tokenizer_path, sample_dir, tmp_path):
  """Our train step (model, loss, AdamW, schedule, clipping) against transformers + torch.optim."""
  from nanollama_jax import optim
  cfg = config.get_default_config()
  cfg.model.update(model_cfg(n_kv_heads=2, vocab_size=512).to_dict())
  cfg.optim.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1, b1=0.9, b2=0.95,
                        eps=1e-8, grad_clip=0.5))
  steps = 5
  params = jax.device_get(model.init_params(cfg.model, 0))
  export.save_hf(str(tmp_path), params, cfg.model)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  hf.train()

  schedule = optim.lr_schedule(cfg.optim, steps)
  tx = optim.make_optimizer(cfg.optim, steps)
  step_fn = step_lib.make_train_step(cfg, model.graph(cfg.model), tx, schedule)
  state = step_lib.init_state(params, tx.init(params), 0)

  decay = [p for n, p in hf.named_parameters() if "norm" not in n]
  no_decay = [p for n, p in hf.named_parameters() if "norm" in n]
  assert len(decay) == 2 + 7 * cfg.model.n_layers and len(no_decay) == 1 + 2 * cfg.model.n_layers
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.optim.lr, betas=(0.9, 0.95), eps=1e-8)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / cfg.optim.lr)

  # Rows of real text (the sample's first stories, tokenised and cut into 33-token rows).
  tok = load_tokenizer(str(tokenizer_path))
  texts = [json.loads(line)["text"] for line in
           open(sample_dir / "train.jsonl")][:40]
  stream = np.array([t for text in texts for t in [tok.bos_id, *tok.encode(text)]], np.int32)
  rows = stream[:steps * 4 * 33].reshape(steps, 4, 33)
  ours, theirs = [], []
  for seq in rows:
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:],
             "segment_ids": np.ones((4, 32), np.int32),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)).copy(),
             "loss_mask": np.ones((4, 32), np.float32)}
    state, metrics = step_fn(state, batch)
    ours.append(float(metrics["loss"]))

    logits = hf(torch.from_numpy(batch["inputs"].astype(np.int64))).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.model.vocab_size),
                                             torch.from_numpy(batch["targets"].astype(np.int64))
                                             .reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.optim.grad_clip)
    opt.step()
    sched.step()
    theirs.append(float(loss.detach()))
  print("ours   ", ours, "\ntheirs ", theirs)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert ours[-1] < ours[0] - 0.05  # the steps really trained


@pytest.mark.slow
def test_export_script_and_generate_script_agree_with_transformers(trained_run, tmp_path):
  out = tmp_path / "hf"
  cli = run_script("export_to_pytorch.py", "--workdir", trained_run.name, "--out", str(out),
                   "--json", cwd=trained_run.parent)
  assert cli.returncode == 0, cli.stderr[-2000:]
  files = json.loads(cli.stdout)["files"]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json"):
    assert name in files
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))

  prompt = "Once upon a time"
  ours = run_script("generate.py", "--workdir", trained_run.name, "--prompt", prompt,
                    "--prompt", "The little dog", "--temperature", "0",
                    "--max-new-tokens", "24", "--json", cwd=trained_run.parent)
  assert ours.returncode == 0, ours.stderr[-2000:]
  completion = json.loads(ours.stdout)["completions"][0]
  with torch.no_grad():
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)
  assert prompt + hf_tok.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True) == completion
  assert len(completion) > len(prompt) + 20


@pytest.mark.slow
def test_init_from_an_exported_directory_starts_from_its_weights(trained_run, tmp_path):
  from nanollama_jax import checkpoint, init_from, train
  out = tmp_path / "hf"
  assert run_script("export_to_pytorch.py", "--workdir", trained_run.name, "--out",
                    str(out), cwd=trained_run.parent).returncode == 0
  cfg, trained, _ = checkpoint.load_run(str(trained_run))
  abstract = sharding.abstract(model.abstract_params(cfg.model),
                                      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  loaded, step = init_from.load_params(str(out), abstract, cfg.model)
  assert step == 0
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg.train.update(dict(steps=2, init_from=str(out), ckpt_every=0, eval_every=2))
  cfg.optim.update(dict(warmup_steps=1, lr=1e-4, min_lr=1e-5))
  _, last = train.train(cfg, str(tmp_path / "finetune"))
  final = json.loads(open(trained_run / "metrics.jsonl").read().splitlines()[-1])
  assert last["eval_loss"] < final["eval_loss"] + 0.05  # starts trained, not from scratch
  assert last["eval_loss"] < 5.0


def test_bfloat16_export_rounds_like_torch_and_reads_back_exactly(tmp_path):
  """The export writes bfloat16 without torch (ml_dtypes): the bytes torch's rounding gives."""
  from safetensors.torch import load_file
  cfg = model_cfg()
  params = random_params(cfg)
  export.save_hf(str(tmp_path), params, cfg, dtype="bfloat16")
  written = load_file(str(tmp_path / export.SAFETENSORS))
  wide = export.to_hf_tensors(params, cfg)
  assert written.keys() == wide.keys() and len(wide) == 21
  for name, value in wide.items():
    assert written[name].dtype == torch.bfloat16
    assert torch.equal(written[name], torch.tensor(value).to(torch.bfloat16)), name
  _, back = export.load_hf(str(tmp_path))
  for name, value in export.to_hf_tensors(back, cfg).items():
    np.testing.assert_array_equal(value, written[name].float().numpy())

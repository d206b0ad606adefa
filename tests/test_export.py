"""Export to Hugging Face Llama, proven with transformers: logits, tokenizer, training, decoding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from nanollama_jax import config, export, model, sharding
from nanollama_jax.data.tokenizer import Tokenizer

torch.set_num_threads(2)


def model_cfg(**overrides):
  m = config.get_default_config().model
  m.update(dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                max_seq_len=64))
  m.update(overrides)
  return m


def random_params(cfg, seed=0):
  """Initialised parameters with the norm scales randomised too, so nothing is trivially 1."""
  params = jax.device_get(model.init_params(cfg, seed))
  rng = np.random.default_rng(seed)

  def jitter(path, x):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    return np.asarray(x)

  return jax.tree_util.tree_map_with_path(jitter, params)


def our_logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: model.apply(model.graph(cfg), p, t))(params, tokens))


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}


@pytest.mark.parametrize("overrides", [
  dict(n_kv_heads=1),
  dict(n_kv_heads=2, tie_embeddings=True),
  dict(n_kv_heads=4, rope_theta=500000.0),
  dict(n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31, tie_embeddings=True),
  dict(n_kv_heads=1, rope_scaling=LLAMA31),
], ids=["mqa", "gqa-tied", "mha-theta500k", "gqa-llama31-tied", "mqa-llama31"])
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
  with pytest.raises(export.ExportError, match="qk_norm=True has no Hugging Face Llama"):
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
  tok = Tokenizer(str(tokenizer_path))
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


def test_kv_cache_decoding_equals_recomputing_the_sequence():
  from nanollama_jax import generate
  cfg = model_cfg(n_kv_heads=2, rope_scaling=LLAMA31)
  params = random_params(cfg, seed=3)
  prompts = [[1, 17, 42, 5, 99], [1, 7], [1, 64, 3, 3, 12, 8, 101, 2, 40]]  # ragged: left padding
  new, logits = generate.generate(cfg, params, prompts, max_new_tokens=12, eos_id=None,
                                  return_logits=True)
  worst = 0.0
  for i, (prompt, row) in enumerate(zip(prompts, new)):
    assert len(row) == 12
    full = our_logits(cfg, params, np.array([prompt + row], np.int32))[0]
    # The logits that chose new token j are the full model's at position len(prompt) - 1 + j.
    expected = full[len(prompt) - 1:len(prompt) - 1 + 12]
    worst = max(worst, float(np.abs(logits[i] - expected).max()))
    assert row == [int(t) for t in expected.argmax(-1)]  # greedy: each token is the argmax
    alone = generate.generate(cfg, params, [prompt], max_new_tokens=12, eos_id=None)
    assert alone == [row]  # the same with and without batch padding
  print(f"max |cached - recomputed logit| {worst:.2e}")
  assert worst < 1e-5


def test_greedy_generation_matches_transformers(tmp_path):
  from nanollama_jax import generate
  cfg = model_cfg(n_kv_heads=1)
  params = random_params(cfg, seed=5)
  params["lm_head_DxV"] = params["lm_head_DxV"] * 30  # peaked logits: no near-ties to break
  export.save_hf(str(tmp_path), params, cfg)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  prompt = [1, 30, 31, 32]
  ours = generate.generate(cfg, params, [prompt], max_new_tokens=20, eos_id=None)[0]
  with torch.no_grad():
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                         do_sample=False, eos_token_id=None, pad_token_id=3)
  assert theirs[0, len(prompt):].tolist() == ours
  assert len(set(ours)) > 2  # a real continuation, not one token repeated


def test_sampling_respects_top_k_top_p_and_the_seed():
  from nanollama_jax import generate
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  top2 = np.asarray(generate.sample_logits(logits, keys, 1.0, 2, 1.0))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
  nucleus = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 0.7))  # 0.5 + 0.3 >= 0.7
  assert set(nucleus.tolist()) == {0, 1}
  everything = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 1.0))
  assert set(everything.tolist()) == {0, 1, 2, 3}
  again = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 1.0))
  np.testing.assert_array_equal(everything, again)


def test_five_training_steps_match_pytorch(tokenizer_path, sample_dir, tmp_path):
  """Our train step (model, loss, AdamW, schedule, clipping) against transformers + torch.optim."""
  from nanollama_jax import optim, train
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
  step_fn = train.make_train_step(cfg, model.graph(cfg.model), tx, schedule)
  state = train.init_state(params, tx.init(params), 0)

  decay = [p for n, p in hf.named_parameters() if "norm" not in n]
  no_decay = [p for n, p in hf.named_parameters() if "norm" in n]
  assert len(decay) == 2 + 7 * cfg.model.n_layers and len(no_decay) == 1 + 2 * cfg.model.n_layers
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.optim.lr, betas=(0.9, 0.95), eps=1e-8)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / cfg.optim.lr)

  # Rows of real text (the sample's first stories, tokenised and cut into 33-token rows).
  tok = Tokenizer(str(tokenizer_path))
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


# --- The scripts, on a small trained run --------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_perplexity_is_exp_of_the_token_weighted_loss_by_hand(trained_run, tmp_path):
  from nanollama_jax import checkpoint, evaluate
  cfg, params, step = checkpoint.load_run(str(trained_run))
  assert step == 40
  tok = Tokenizer(str(trained_run / "tokenizer.model"))
  texts = ["Once upon a time, there was a cat.", "The dog ran to the park.", "Tom was happy."]
  path = tmp_path / "small.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  result = evaluate.perplexity(cfg, params, tok, str(path))

  # By hand: each document alone through the model, log-softmax, summed over its targets.
  total, count = 0.0, 0
  for text in texts:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    logits = our_logits(cfg.model, params, np.array([ids[:-1]], np.int32))[0].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total += float(sum(logz[t] - logits[t, ids[t + 1]] for t in range(len(ids) - 1)))
    count += len(ids) - 1
  assert result["tokens"] == count
  assert result["loss"] == pytest.approx(total / count, rel=1e-5)
  assert result["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)

  cli = run_script("eval_perplexity.py", "--workdir", str(trained_run), "--files", str(path),
                   "--json")
  assert cli.returncode == 0, cli.stderr[-2000:]
  out = json.loads(cli.stdout)
  assert out["step"] == 40 and out["tokens"] == count
  assert out["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
  # Over the validation split the numbers are the run's final evaluation's, on more tokens.
  whole = run_script("eval_perplexity.py", "--workdir", str(trained_run), "--json",
                     "--step", "20")
  assert whole.returncode == 0 and json.loads(whole.stdout)["step"] == 20
  assert json.loads(whole.stdout)["tokens"] > 30000
  missing = run_script("eval_perplexity.py", "--workdir", str(trained_run), "--step", "7")
  assert missing.returncode != 0 and "no checkpoint for step 7" in missing.stderr


def test_export_script_and_generate_script_agree_with_transformers(trained_run, tmp_path):
  out = tmp_path / "hf"
  cli = run_script("export_to_pytorch.py", "--workdir", str(trained_run), "--out", str(out),
                   "--json")
  assert cli.returncode == 0, cli.stderr[-2000:]
  files = json.loads(cli.stdout)["files"]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json"):
    assert name in files
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))

  prompt = "Once upon a time"
  ours = run_script("generate.py", "--workdir", str(trained_run), "--prompt", prompt,
                    "--prompt", "The little dog", "--temperature", "0",
                    "--max-new-tokens", "24", "--json")
  assert ours.returncode == 0, ours.stderr[-2000:]
  completion = json.loads(ours.stdout)["completions"][0]
  with torch.no_grad():
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)
  assert prompt + hf_tok.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True) == completion
  assert len(completion) > len(prompt) + 20


def test_init_from_an_exported_directory_starts_from_its_weights(trained_run, tmp_path):
  from nanollama_jax import checkpoint, train
  out = tmp_path / "hf"
  assert run_script("export_to_pytorch.py", "--workdir", str(trained_run), "--out",
                    str(out)).returncode == 0
  cfg, trained, _ = checkpoint.load_run(str(trained_run))
  abstract = sharding.abstract(model.abstract_params(cfg.model),
                                      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  loaded, step = checkpoint.load_params(str(out), abstract, cfg.model)
  assert step == 0
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg.train.update(dict(steps=2, init_from=str(out), ckpt_every=0, eval_every=2))
  cfg.optim.update(dict(warmup_steps=1, lr=1e-4, min_lr=1e-5))
  _, last = train.train(cfg, str(tmp_path / "finetune"))
  final = json.loads(open(trained_run / "metrics.jsonl").read().splitlines()[-1])
  assert last["eval_loss"] < final["eval_loss"] + 0.05  # starts trained, not from scratch
  assert last["eval_loss"] < 5.0

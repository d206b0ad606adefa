"""Helpers shared by the test modules: small model configs, parameters, logits, scripts."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from nanollama_jax import config, model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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




def free_port():
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices):
  """This process's environment for a subprocess that fakes `devices` CPU devices (the other
  XLA flags conftest.py sets are kept)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags.strip()}")


def tiny_run_args(workdir, sample_dir, tokenizer_path, steps):
  """The trainer's arguments for a tiny model on the sample at a constant learning rate after
  warmup (min_lr = lr: the losses of a run do not depend on train.steps, so a run stopped at a
  step a test does not know beforehand compares with one trained to exactly there), every step
  logged, a checkpoint only at the end or when stopped."""
  return ["--config", os.path.join(REPO, "configs", "tinystories_cpu.py"),
          "--workdir", str(workdir), "--config.data.source=files",
          f"--config.data.train_files={sample_dir / 'train.jsonl'}", "--config.data.eval_files=",
          f"--config.data.tokenizer={tokenizer_path}", "--config.model.vocab_size=512",
          "--config.model.dim=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
          "--config.model.n_kv_heads=2", "--config.model.ffn_dim=128",
          "--config.data.seq_len=32", "--config.data.batch_size=8", f"--config.train.steps={steps}",
          "--config.train.log_every=1", "--config.train.ckpt_every=0",
          "--config.optim.warmup_steps=2", "--config.optim.lr=3e-3", "--config.optim.min_lr=3e-3"]


def run_script(name, *args, cwd=REPO, env=None):
  """Runs scripts/<name> with the test's Python (in `env`, default this process's environment);
  relative paths resolve against `cwd`."""
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                        capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def tiny_config(sample_dir, tokenizer_path, **train_overrides):
  """A 2-layer model trained on the sample with the session tokenizer (80 steps by default)."""
  cfg = config.get_default_config()
  cfg.model.update(dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=160, max_seq_len=64))
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"),
                       eval_files=str(sample_dir / "validation.jsonl"),
                       tokenizer=str(tokenizer_path), seq_len=64, batch_size=16))
  cfg.optim.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=10))
  cfg.train.update(dict(steps=80, log_every=20, eval_every=40, eval_steps=8))
  cfg.train.update(train_overrides)
  return cfg


def train_pre_chat_tokenizer(texts, vocab_size, path):
  """A tokenizer trained like this project's before the chat tokens were reserved (ids 4-9 are
  ordinary pieces)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  lines = [line for text in texts for line in text.split("\n") if line]
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines), model_prefix=str(path).removesuffix(".model"),
    model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
  return path


def assistant_tokens(tok, conversations):
  """What the assistant writes, counted by hand: reasoning with its markers, content, <|end|>."""
  count = 0
  for conversation in conversations:
    for m in conversation:
      if m.role == "assistant":
        count += len(tok.encode(m.content)) + 1
        count += len(tok.encode(m.reasoning)) + 2 if m.reasoning else 0
  return count


# Llama 3's first special tokens, in its order, and a chat template of its format.
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_TEMPLATE = (
  "{{- bos_token }}{%- for message in messages %}"
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] "
  "| trim + '<|eot_id|>' }}{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
  "{%- endif %}")

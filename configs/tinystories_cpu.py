"""A TinyStories model small enough to learn little stories on a 2-core CPU in about ten minutes.

Same architecture family as configs/tinystories.py (GQA, RoPE, SwiGLU), shrunk: dim 256, 4 layers,
vocab 4096, float32. Data from the Hub by default; on local files:
  --config.data.source=files --config.data.train_files='data/train.jsonl'
  --config.data.eval_files='data/validation.jsonl'
"""

from nanollama_jax.config import get_default_config


def get_config():
  cfg = get_default_config()

  cfg.model.vocab_size = 4096
  cfg.model.dim = 256
  cfg.model.n_layers = 4
  cfg.model.n_heads = 8
  cfg.model.n_kv_heads = 4
  cfg.model.ffn_dim = 704
  cfg.model.max_seq_len = 256
  cfg.model.dtype = "float32"
  # Four layers compile in seconds unrolled, and on a CPU the unrolled stack is ~10% faster than
  # the scan, which zero-fills and copies stacked per-layer activations (docs/performance.md).
  cfg.model.scan_layers = False

  cfg.data.source = "hf"
  cfg.data.hf_path = "roneneldan/TinyStories"
  cfg.data.tokenizer_train_docs = 20_000
  cfg.data.seq_len = 128
  cfg.data.batch_size = 32

  cfg.optim.lr = 2e-3
  cfg.optim.min_lr = 1e-4
  cfg.optim.warmup_steps = 40

  cfg.train.steps = 400
  cfg.train.log_every = 25
  cfg.train.eval_every = 100
  cfg.train.eval_steps = 50
  cfg.train.ckpt_every = 100
  cfg.train.sample_tokens = 48  # greedy stories from the prompts, at each evaluation
  cfg.train.sample_every = 100
  return cfg

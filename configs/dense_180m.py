"""The "180M" dense model for one GPU: deep and narrow, with QK-norm and tied embeddings.

32 layers, dim 768, 12 query / 4 KV heads (head dim 64), SwiGLU FFN 2048, QK-norm (RMSNorm on
each head of q and k before RoPE), tied embeddings, vocab 32768, context 2048, RoPE theta
10000. This shape counts 226,546,432 parameters (25,165,824 in the embedding, 201,380,608 in
the layers and final norm): the name is the shape's working title, not its count; a SwiGLU FFN
of 2048 with three matrices is what makes it larger than 180M. One step = 128 x 2048 =
262,144 tokens in 4 micro-batches; the layer scan keeps compile time flat in the 32 layers.

Tokenizer: Mistral's v3 (32,768 pieces, sentencepiece), read from the Hub as
hf:mistralai/Mistral-7B-v0.3 (gated: accept its terms on the model's page and set HF_TOKEN).
The same model file ships in the mistral-common wheel (pip install mistral-common):
--config.data.tokenizer=SITE_PACKAGES/mistral_common/data/mistral_instruct_tokenizer_240323.model.v3
reads it offline; --config.data.tokenizer= (empty) trains this project's own instead.
"""

from nanollama_jax.config import get_default_config


def get_config():
  cfg = get_default_config()

  cfg.model.vocab_size = 32768
  cfg.model.dim = 768
  cfg.model.n_layers = 32
  cfg.model.n_heads = 12
  cfg.model.n_kv_heads = 4
  cfg.model.ffn_dim = 2048
  cfg.model.qk_norm = True
  cfg.model.tie_embeddings = True
  cfg.model.rope_theta = 10000.0
  cfg.model.max_seq_len = 2048
  cfg.model.dtype = "bfloat16"
  cfg.model.attention = "auto"  # our Pallas kernel on a CUDA GPU, splash on a TPU
  cfg.model.remat = "save_attn"

  cfg.data.source = "hf"
  cfg.data.hf_path = "HuggingFaceFW/fineweb-edu"
  cfg.data.hf_name = "sample-10BT"
  cfg.data.hf_train_split = "train"
  cfg.data.hf_eval_split = "train"  # FineWeb-Edu has no other split: evaluate on a held-out
  # 0.5% of it (by a hash of each document), which training skips. An evaluation reads
  # eval_steps x batch_size x seq_len = 5.2M tokens, ~5k documents of ~1k tokens; the
  # 9.7M documents hold ~48k out, and the eval batches are built once per run from
  # the first ~1M documents streamed.
  cfg.data.holdout_fraction = 0.005
  cfg.data.text_key = "text"
  cfg.data.seq_len = 2048
  cfg.data.batch_size = 128
  cfg.data.num_workers = 8
  cfg.data.tokenizer = "hf:mistralai/Mistral-7B-v0.3"  # Mistral's v3 (see above)
  cfg.data.tokenizer_train_docs = 200_000  # with data.tokenizer empty: train our own on these

  cfg.optim.lr = 1e-3
  cfg.optim.min_lr = 1e-4
  cfg.optim.warmup_steps = 1000
  cfg.optim.grad_accum = 4

  cfg.train.steps = 40_000  # 10.5B tokens
  cfg.train.log_every = 10
  cfg.train.eval_every = 2000
  cfg.train.eval_steps = 20
  cfg.train.ckpt_every = 1000
  return cfg

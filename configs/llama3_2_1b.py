"""A model of the Llama 3.2 1B shape, pretrained from scratch, sized for one H100 (80 GB).

16 layers, dim 2048, 32 query / 8 KV heads (head dim 64), SwiGLU FFN 8192, vocab 128256, tied
embeddings, RoPE theta 500000 with the Llama 3.1 frequency scaling (factor 32, low/high
frequency factors 1/4, original context 8192): 1,235,814,400 parameters, Meta's published
count for Llama 3.2 1B.

Tokenizer: Llama 3's (128,256 ids, byte-level BPE), read from the Hub as
hf:meta-llama/Llama-3.2-1B. Meta's repositories are gated: accept the licence on
https://huggingface.co/meta-llama/Llama-3.2-1B and set HF_TOKEN (or `hf auth login`), or copy
its tokenizer.json and tokenizer_config.json to a directory and pass
--config.data.tokenizer=DIR; --config.data.tokenizer= (empty) trains this project's own
sentencepiece tokenizer of model.vocab_size pieces instead. To continue Meta's weights rather
than start from scratch: --config.train.init_from=hf:meta-llama/Llama-3.2-1B (the shape and the
tokenizer then come from there; docs/checkpoints.md). Data:
FineWeb-Edu (sample-10BT) from the Hub; it has only a train split, so evaluation reads 0.5%
of its documents held out of training (data.holdout_fraction) -- or point data.source=files
at your own shards. One step = 64 x 2048 = 131,072 tokens in 8 micro-batches of 8, each
layer rematerialised; on several GPUs or a TPU slice raise mesh.fsdp / mesh.data (the batch is
split over data x fsdp) and lower optim.grad_accum.

A realistic mixture for this recipe (three open Hub datasets, streamed; weights are shares of
training windows):
  --config.data.mixture='hf:HuggingFaceFW/fineweb-edu:sample-10BT=0.7;hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2=0.2;hf:open-web-math/open-web-math=0.1'
"""

from nanollama_jax.config import get_default_config


def get_config():
  cfg = get_default_config()

  cfg.model.vocab_size = 128256
  cfg.model.dim = 2048
  cfg.model.n_layers = 16
  cfg.model.n_heads = 32
  cfg.model.n_kv_heads = 8
  cfg.model.ffn_dim = 8192
  cfg.model.norm_eps = 1e-5
  cfg.model.rope_theta = 500000.0
  cfg.model.rope_scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
  cfg.model.tie_embeddings = True
  cfg.model.max_seq_len = 2048
  cfg.model.dtype = "bfloat16"
  cfg.model.attention = "auto"  # our Pallas kernel on a CUDA GPU, splash on a TPU
  cfg.model.remat = "full"

  cfg.data.source = "hf"
  cfg.data.hf_path = "HuggingFaceFW/fineweb-edu"
  cfg.data.hf_name = "sample-10BT"
  cfg.data.hf_train_split = "train"
  cfg.data.hf_eval_split = "train"  # FineWeb-Edu has no other split: evaluate on a held-out
  # 0.5% of it (by a hash of each document), which training skips. An evaluation reads
  # eval_steps x batch_size x seq_len = 2.6M tokens, ~2.6k documents of ~1k tokens; the
  # 9.7M documents hold ~48k out, and the eval batches are built once per run from
  # the first ~0.5M documents streamed.
  cfg.data.holdout_fraction = 0.005
  cfg.data.text_key = "text"
  cfg.data.seq_len = 2048
  cfg.data.batch_size = 64
  cfg.data.num_workers = 8
  cfg.data.tokenizer = "hf:meta-llama/Llama-3.2-1B"  # Llama 3's; gated (see above)
  cfg.data.tokenizer_train_docs = 200_000  # with data.tokenizer empty: train our own on these

  cfg.optim.lr = 3e-4
  cfg.optim.min_lr = 3e-5
  cfg.optim.warmup_steps = 2000
  cfg.optim.grad_accum = 8

  cfg.train.steps = 100_000  # 13.1B tokens
  cfg.train.log_every = 10
  cfg.train.eval_every = 2000
  cfg.train.eval_steps = 20
  cfg.train.ckpt_every = 1000
  return cfg

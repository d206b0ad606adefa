"""A model of the Llama 3.1 8B shape, pretrained from scratch on a pod slice or one 8-GPU node.

32 layers, dim 4096, 32 query / 8 KV heads (head dim 128), SwiGLU FFN 14336, vocab 128256,
untied output projection, RoPE theta 500000 with the Llama 3.1 frequency scaling (factor 8,
low/high frequency factors 1/4, original context 8192), context 8192: 8,030,261,248
parameters, Meta's published count for Llama 3.1 8B.

One step = 128 x 8192 = 1,048,576 tokens, every layer rematerialised, parameters and
optimizer state sharded over all devices (mesh.fsdp = -1). Two sizings, checked by compiling
for the hardware on a CPU host (scripts/aot_compile.py; the numbers are in docs/performance.md):

  configs/llama3_1_8b.py           a TPU v5p-128 (64 chips): 2 sequences per chip, no accumulation
  configs/llama3_1_8b.py:h100x8    one node of 8 x H100 80GB: 2 micro-batches of 8 sequences
                                   per GPU (16 at once do not fit; --max-batch finds 12)

  python scripts/aot_compile.py --config configs/llama3_1_8b.py --targets v5p-128
  python scripts/aot_compile.py --config configs/llama3_1_8b.py:h100x8 --targets h100_sxm:8

Tokenizer: Llama 3's (128,256 ids, byte-level BPE), read from the Hub as
hf:meta-llama/Llama-3.1-8B. Meta's repositories are gated: accept the licence on
https://huggingface.co/meta-llama/Llama-3.1-8B and set HF_TOKEN (or `hf auth login`), or copy
its tokenizer.json and tokenizer_config.json to a directory and pass
--config.data.tokenizer=DIR; --config.data.tokenizer= (empty) trains this project's own
sentencepiece tokenizer instead.

Data: FineWeb-Edu (sample-100BT) from the Hub, or data.source=files for your own shards.
"""

from nanollama_jax.config import get_default_config

# Sizing name -> gradient accumulation steps for the global batch of 128 sequences.
SIZINGS = {"v5p_128": 1, "h100x8": 2}


def get_config(sizing: str = "v5p_128"):
  if sizing not in SIZINGS:
    raise ValueError(f"configs/llama3_1_8b.py:{sizing}: the sizings are {', '.join(SIZINGS)}")
  cfg = get_default_config()

  cfg.model.vocab_size = 128256
  cfg.model.dim = 4096
  cfg.model.n_layers = 32
  cfg.model.n_heads = 32
  cfg.model.n_kv_heads = 8
  cfg.model.ffn_dim = 14336
  cfg.model.norm_eps = 1e-5
  cfg.model.rope_theta = 500000.0
  cfg.model.rope_scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
  cfg.model.tie_embeddings = False
  cfg.model.max_seq_len = 8192
  cfg.model.dtype = "bfloat16"
  cfg.model.attention = "auto"  # our Pallas kernel on a CUDA GPU, splash on a TPU
  cfg.model.remat = "full"

  cfg.data.source = "hf"
  cfg.data.hf_path = "HuggingFaceFW/fineweb-edu"
  cfg.data.hf_name = "sample-100BT"
  cfg.data.hf_train_split = "train"
  cfg.data.hf_eval_split = "train"  # FineWeb-Edu has no other split: evaluate on a held-out
  # 0.5% of it (by a hash of each document), which training skips. An evaluation reads
  # eval_steps x batch_size x seq_len = 10.5M tokens, ~10k documents of ~1k tokens; the
  # 97M documents hold ~490k out, and the eval batches are built once per run from
  # the first ~2M documents streamed.
  cfg.data.holdout_fraction = 0.005
  cfg.data.text_key = "text"
  cfg.data.seq_len = 8192
  cfg.data.batch_size = 128
  cfg.data.num_workers = 8
  cfg.data.tokenizer = "hf:meta-llama/Llama-3.1-8B"  # Llama 3's; gated (see above)
  cfg.data.tokenizer_train_docs = 500_000  # with data.tokenizer empty: train our own on these

  cfg.optim.lr = 3e-4
  cfg.optim.min_lr = 3e-5
  cfg.optim.warmup_steps = 2000
  cfg.optim.grad_accum = SIZINGS[sizing]

  cfg.train.steps = 100_000  # 105B tokens
  cfg.train.log_every = 10
  cfg.train.eval_every = 2000
  cfg.train.eval_steps = 10
  cfg.train.ckpt_every = 500
  return cfg

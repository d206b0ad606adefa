"""A model of the TinyLlama 1.1B shape, pretrained from scratch on one H100 (80 GB) or 16 A100s.

22 layers, dim 2048, 32 query / 4 KV heads (head dim 64), SwiGLU FFN 5632, vocab 32000, untied
output projection, RoPE theta 10000, context 2048: 1,100,048,384 parameters, the count of the
published TinyLlama-1.1B checkpoints. TinyLlama was trained on SlimPajama and StarCoder data
with batch 1024 x 2048 tokens and lr 4e-4; this recipe keeps the shape and the lr and uses
FineWeb-Edu, every layer rematerialised. Tokenizer: Llama 2's (32,000 pieces, sentencepiece),
as TinyLlama used it, read from the Hub as hf:TinyLlama/TinyLlama_v1.1 (not gated); offline,
copy its tokenizer.model (or tokenizer.json) to a directory and pass --config.data.tokenizer=DIR,
or --config.data.tokenizer= (empty) to train this project's own.

Two sizings, checked by compiling for the hardware on a CPU host (scripts/aot_compile.py; the
numbers are in docs/performance.md):

  configs/tinyllama_1b.py             one H100 80GB: 64 x 2048 tokens a step in 8 micro-batches
  configs/tinyllama_1b.py:a100x16     TinyLlama's own setup, 2 nodes of 8 x A100 80GB: its batch
                                      of 1024 x 2048 = 2,097,152 tokens, 64 sequences per GPU,
                                      no accumulation (up to 176 per GPU fit)

A realistic mixture for this recipe (three open Hub datasets, streamed; weights are shares of
training windows):
  --config.data.mixture='hf:HuggingFaceFW/fineweb-edu:sample-10BT=0.7;hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2=0.2;hf:open-web-math/open-web-math=0.1'
"""

from nanollama_jax.config import get_default_config

# Sizing name -> (global batch in sequences, gradient accumulation steps).
SIZINGS = {"h100": (64, 8), "a100x16": (1024, 1)}


def get_config(sizing: str = "h100"):
  if sizing not in SIZINGS:
    raise ValueError(f"configs/tinyllama_1b.py:{sizing}: the sizings are {', '.join(SIZINGS)}")
  cfg = get_default_config()

  cfg.model.vocab_size = 32000
  cfg.model.dim = 2048
  cfg.model.n_layers = 22
  cfg.model.n_heads = 32
  cfg.model.n_kv_heads = 4
  cfg.model.ffn_dim = 5632
  cfg.model.norm_eps = 1e-5
  cfg.model.rope_theta = 10000.0
  cfg.model.tie_embeddings = False
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
  # eval_steps x batch_size x seq_len = 2.6M tokens (2.1M in a100x16), ~2.6k documents of ~1k
  # tokens; the 9.7M documents hold ~48k out, and the eval batches are built once per run
  # from the first ~0.5M documents streamed.
  cfg.data.holdout_fraction = 0.005
  cfg.data.text_key = "text"
  cfg.data.seq_len = 2048
  cfg.data.batch_size = SIZINGS[sizing][0]
  cfg.data.num_workers = 8
  cfg.data.tokenizer = "hf:TinyLlama/TinyLlama_v1.1"  # Llama 2's (see above)
  cfg.data.tokenizer_train_docs = 200_000  # with data.tokenizer empty: train our own on these

  cfg.optim.lr = 4e-4
  cfg.optim.min_lr = 4e-5
  cfg.optim.warmup_steps = 2000
  cfg.optim.grad_accum = SIZINGS[sizing][1]

  cfg.train.steps = 100_000
  cfg.train.log_every = 10
  cfg.train.eval_every = 2000
  # About the same tokens per evaluation in both sizings (a100x16: one batch of 1024): 20
  # batches of 1024 would need ~40k of the ~48k held-out documents, streaming nearly all of
  # sample-10BT to find them.
  cfg.train.eval_steps = max(1, 20 * 64 // cfg.data.batch_size)
  cfg.train.ckpt_every = 1000
  return cfg

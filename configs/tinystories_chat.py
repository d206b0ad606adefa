"""Fine-tunes a configs/tinystories_cpu.py model to answer in the chat format (docs/chat.md).

Starts from the weights of a trained run and must use that run's tokenizer; by default the run
the README's offline command trains:
  python -m nanollama_jax.train --config configs/tinystories_chat.py --workdir runs/ts_chat \
      --config.train.init_from=runs/ts_sample --config.data.tokenizer=runs/ts_sample/tokenizer.model
The shape is tinystories_cpu.py's (read from that file, so the two cannot drift apart); the data is
the chat sample that ships with the package (360 training and 50 validation conversations made
from TinyStories), with data.format="chat": only what the assistant writes is trained and
evaluated. A lower peak learning rate than pretraining (3e-4 against 2e-3), a short warmup, and
few steps: the 360 conversations are about 18 steps of 32 x 128 tokens.
"""

import os
import runpy

from nanollama_jax.data import CHAT_SAMPLE


def get_config():
  cfg = runpy.run_path(os.path.join(os.path.dirname(__file__), "tinystories_cpu.py"))[
    "get_config"]()

  cfg.data.source = "files"
  cfg.data.format = "chat"
  cfg.data.train_files = str(CHAT_SAMPLE / "train.jsonl")
  cfg.data.eval_files = str(CHAT_SAMPLE / "validation.jsonl")
  cfg.data.tokenizer = "runs/ts_sample/tokenizer.model"  # the pretrained run's: keep them paired

  cfg.optim.lr = 3e-4
  cfg.optim.min_lr = 3e-5
  cfg.optim.warmup_steps = 5

  cfg.train.init_from = "runs/ts_sample"
  cfg.train.steps = 60
  cfg.train.log_every = 10
  cfg.train.eval_every = 20
  cfg.train.eval_steps = 50  # the whole validation split
  cfg.train.ckpt_every = 0  # the end only
  # Greedy replies to these user turns, at each evaluation.
  cfg.train.sample_prompts = ("Tell me a short story about a little dog named Max.|"
                              "Write a story that begins with: One day, Lily found a red ball.")
  cfg.train.sample_tokens = 64
  cfg.train.sample_every = 20
  return cfg

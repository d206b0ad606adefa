"""Continues prompts with a trained run's model (KV-cache decoding).

  python scripts/generate.py --workdir runs/ts --prompt "Once upon a time" [--prompt ...]
      [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]

Temperature 0 is greedy. Each prompt is encoded as [BOS] + text, like the training documents;
generation stops at EOS or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from nanollama_jax import checkpoint, generate
from nanollama_jax.data.tokenizer import workdir_tokenizer


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  try:
    cfg, params, step = checkpoint.load_run(args.workdir, args.step)
    tok = workdir_tokenizer(args.workdir)
    max_new = min(args.max_new_tokens,
                  cfg.model.max_seq_len - max(len(tok.encode(t)) + 1 for t in args.prompt))
    if max_new < 1:
      raise ValueError(f"the prompt fills the model's context of {cfg.model.max_seq_len} tokens")
    out = generate.generate(cfg.model, params, [[tok.bos_id, *tok.encode(t)] for t in args.prompt],
                            max_new, args.temperature, args.top_k, args.top_p, args.seed,
                            eos_id=tok.eos_id, pad_id=tok.pad_id)
  except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  texts = [prompt + tok.decode(ids) for prompt, ids in zip(args.prompt, out)]
  if args.json:
    print(json.dumps({"step": step, "completions": texts, "new_tokens": [len(o) for o in out]}))
  else:
    for text in texts:
      print(text, end="\n\n")


if __name__ == "__main__":
  main()

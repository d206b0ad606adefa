"""Perplexity of a trained run over its validation split or given files.

  python scripts/eval_perplexity.py --workdir runs/ts [--files 'data/val*.jsonl'] [--step N] [--json]
      [--seq-len N]

Every token of every document is a target exactly once (documents as [BOS] + text + [EOS],
packed like in training); the result is the token-weighted mean loss and exp of it. A chat run
(data.format='chat') reads --files as conversations and counts only what the assistant writes,
as in its training. --seq-len evaluates rows of N tokens instead of the run's data.seq_len, up
to the model's whole context (model.max_seq_len), keeping the run's tokens per batch.
"""

from __future__ import annotations

import argparse
import json

from nanollama_jax import checkpoint, errors, evaluate
from nanollama_jax.data.tokenizer_source import workdir_tokenizer


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--files", default=None,
                 help="comma-separated globs of .jsonl/.txt files (default: the run's eval split); "
                 "in the run's data.format")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--max-batches", type=int, default=10**9, help="stop after this many batches")
  p.add_argument("--seq-len", type=int, default=0,
                 help="tokens per row (default: the run's data.seq_len; at most max_seq_len)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  cfg, params, step = checkpoint.load_run(args.workdir, args.step)
  tokenizer = workdir_tokenizer(args.workdir)
  result = evaluate.perplexity(cfg, params, tokenizer, args.files, max_batches=args.max_batches,
                               seq_len=args.seq_len)
  result["step"] = step
  if args.json:
    print(json.dumps(result))
  else:
    source = args.files or "the validation split"
    print(f"step {step}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over "
          f"{result['tokens']:,} tokens of {source}")


if __name__ == "__main__":
  errors.cli(main)

"""Trains a sentencepiece BPE tokenizer on local .jsonl / .txt / .parquet files.

  python scripts/train_tokenizer.py --input 'data/*.jsonl' --vocab-size 4096 --out tok.model

With --format chat, the records' conversations ("messages") are read and the tokenizer is trained
on their texts. Every tokenizer trained here reserves the chat markers (ids 4-9, see
data/chat.py). A run uses it with --config.data.tokenizer=tok.model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from nanollama_jax import config, data_spec, errors
from nanollama_jax.data import records, spm_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--input", required=True, help="comma-separated globs of .jsonl/.json/.txt/.parquet files")
  p.add_argument("--vocab-size", type=int, required=True, help="exact number of pieces")
  p.add_argument("--out", required=True, help="where to write the .model file")
  p.add_argument("--text-key", default="text", help="the JSON field holding each document")
  p.add_argument("--format", default="text", choices=config.FORMATS,
                 help="chat: read conversations from the 'messages' field (as data.format)")
  p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  files = data_spec.expand_globs(args.input, "--input")
  docs = list(itertools.islice(
    records.read_files(files, args.text_key, doc_format=args.format), args.max_docs))
  texts = records.texts(docs)
  tok = spm_tokenizer.train_tokenizer(texts, args.vocab_size, args.out)
  seconds = time.perf_counter() - start
  sample = texts[0][:60] if texts else ""
  sample_ids = tok.encode(sample)
  tokens = sum(len(tok.encode(t)) for t in texts)
  summary = {
    "out": args.out,
    "vocab_size": tok.vocab_size,
    "documents": len(docs),
    "seconds": round(seconds, 3),
    "sample": sample,
    "sample_tokens": len(sample_ids),
    "chars_per_token": round(sum(map(len, texts)) / max(tokens, 1), 3),
  }
  if args.json:
    print(json.dumps(summary))
    return
  print(f"Wrote {args.out}: vocab {tok.vocab_size}, {len(docs)} documents read and trained on "
        f"in {seconds:.1f} s")
  print(f"{summary['chars_per_token']} characters per token over those documents")
  print(f"{sample!r} -> {len(sample_ids)} tokens: {sample_ids}")


if __name__ == "__main__":
  errors.cli(main)

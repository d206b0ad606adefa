"""Tokenizes a corpus once into a pretokenized dataset directory that training reads by index.

  python scripts/prepare_dataset.py --tokenizer tok.model --input 'data/train*.jsonl' \
      --out data/train_tokens [--num-workers 8]
  python scripts/prepare_dataset.py --tokenizer tok.model --hf-path roneneldan/TinyStories \
      --split train --out data/ts_train

Train on it with --config.data.train_files=data/train_tokens (the same for eval_files); the
run's tokenizer must be the one given here (by default a run takes the dataset's own copy).
Documents are stored without BOS/EOS, which the pipeline adds. Empty documents and lines that
are not UTF-8 are skipped and counted.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator

import tqdm

from nanollama_jax import data_spec
from nanollama_jax import errors
from nanollama_jax.data import hub_data, records, shards
from nanollama_jax.data import tokenizer_source
from nanollama_jax.data.tokenizer import Tokenizer

_CHUNK = 256  # documents per tokenisation task
_worker_tokenizer: Tokenizer | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tokenizer", required=True, help="the tokenizer to encode with: a sentencepiece model, a tokenizer.json, a "
                 "directory holding one, or hf:ORG/NAME (as data.tokenizer)")
  p.add_argument("--out", required=True, help="the dataset directory to create")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", help="comma-separated globs of .jsonl/.json/.txt/.parquet files")
  src.add_argument("--hf-path", help="a Hugging Face dataset, streamed (e.g. roneneldan/TinyStories)")
  p.add_argument("--hf-name", default=None, help="the Hub dataset's config name")
  p.add_argument("--hf-data-files", default=None, help="data_files for loaders such as 'json'")
  p.add_argument("--split", default="train", help="the Hub split to read (default: train)")
  p.add_argument("--text-key", default="text", help="the field holding each document")
  p.add_argument("--text-separator", default="",
                 help=".txt files: the document separator (default: one document per line)")
  p.add_argument("--num-workers", type=int, default=0,
                 help="tokenizer processes (default 0: in this process)")
  p.add_argument("--shard-tokens", type=int, default=100_000_000,
                 help="tokens per shard file (default 100M)")
  p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  return p.parse_args(argv)


def _texts(args: argparse.Namespace, skipped: collections.Counter) -> Iterator[str]:
  if args.input:
    files = data_spec.expand_globs(args.input, "--input")
    if any(shards.is_dataset(f) for f in files):
      raise errors.UsageError(f"--input={args.input!r} matches a pretokenized dataset, not text "
                              "files")
    return records.read_files(files, args.text_key, args.text_separator, skipped)
  stream = hub_data.HubStream(args.hf_path, args.hf_name, args.split, args.text_key,
                              args.hf_data_files)
  stream.skipped = skipped
  return (text for text, _ in stream)


def _init_worker(tokenizer: Tokenizer) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer


def _encode(texts: list[str]) -> list[list[int]]:
  return _worker_tokenizer.encode_batch(texts)


def prepare(args: argparse.Namespace) -> dict:
  tokenizer = tokenizer_source.load(args.tokenizer, "--tokenizer")
  skipped: collections.Counter = collections.Counter()
  texts = itertools.islice(_texts(args, skipped), args.max_docs)
  chunks = iter(lambda: list(itertools.islice(texts, _CHUNK)), [])
  source = ({"input": args.input} if args.input else
            {"hf_path": args.hf_path, "hf_name": args.hf_name, "split": args.split})
  writer = shards.ShardWriter(args.out, tokenizer, shard_tokens=args.shard_tokens,
                              overwrite=args.overwrite, source={**source, "text_key": args.text_key})
  start = time.perf_counter()
  pool = None
  try:
    if args.num_workers:
      pool = multiprocessing.get_context("spawn").Pool(
        args.num_workers, initializer=_init_worker, initargs=(tokenizer,))
      encoded = pool.imap(_encode, chunks)  # in order: the dataset is deterministic
    else:
      _init_worker(tokenizer)
      encoded = map(_encode, chunks)
    with tqdm.tqdm(unit=" docs", desc=f"tokenizing into {args.out}", disable=None,
                   file=sys.stderr) as bar:
      for docs in encoded:
        writer.add(docs)
        bar.update(len(docs))
    index = writer.close(skipped=dict(skipped))
  except BaseException:
    writer.abort()
    raise
  finally:
    if pool is not None:
      pool.terminate()
  seconds = time.perf_counter() - start
  return {"out": args.out, "documents": index["documents"], "tokens": index["tokens"],
          "shards": len(index["shards"]), "dtype": index["dtype"], "skipped": dict(skipped),
          "seconds": round(seconds, 3), "tokens_per_s": round(index["tokens"] / seconds)}


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  summary = prepare(args)
  if args.json:
    print(json.dumps(summary))
    return
  skipped = ", ".join(f"{n} {what}" for what, n in summary["skipped"].items()) or "nothing"
  print(f"Wrote {summary['out']}: {summary['documents']:,} documents, {summary['tokens']:,} "
        f"tokens in {summary['shards']} shard(s) of {summary['dtype']} in "
        f"{summary['seconds']:.1f} s ({summary['tokens_per_s']:,} tokens/s); skipped {skipped}")


if __name__ == "__main__":
  errors.cli(main)

"""Continues prompts with a trained run's model (KV-cache decoding), or answers them as a chat.

  python scripts/generate.py --workdir runs/ts --prompt "Once upon a time" [--prompt ...]
      [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
  python scripts/generate.py --workdir runs/ts_chat --chat --prompt "Tell me a story."
      [--system "You are a storyteller."]
  python scripts/generate.py --workdir runs/ts --prompts-file IN.jsonl --out OUT.jsonl
      [--batch-size 8]

Temperature 0 is greedy. Each prompt is encoded as [BOS] + text, like the training documents;
generation stops at EOS or after --max-new-tokens (fewer where the model's context ends: said
in one line). With --chat (a model fine-tuned on data.format='chat'), each prompt is a user
turn (after a system turn with --system) and the assistant's turn is started; generation stops
at its end of turn, and the assistant's reply is printed, its reasoning (<think> ... </think>,
if it wrote some) on a line of its own before it.

--prompts-file serves many prompts: one JSON object a line, {"prompt": "..."} (with --chat
also an optional "system"); they run in batches of --batch-size rows (the last one padded, so
every batch runs one compiled program), with a progress bar. --out gets one JSON object a line,
in the order of the prompts: the prompt, its completion (or reply and reasoning), the number of
new tokens, the checkpoint step and the sampling settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import tqdm

from nanollama_jax import checkpoint, errors, generate
from nanollama_jax.data import chat
from nanollama_jax.data.tokenizer_source import workdir_tokenizer


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
  p.add_argument("--prompts-file", help="a JSONL file of {\"prompt\": ...} objects to serve")
  p.add_argument("--out", help="with --prompts-file: the JSONL file the results go to")
  p.add_argument("--batch-size", type=int, default=8, help="with --prompts-file: rows per batch")
  p.add_argument("--chat", action="store_true",
                 help="each prompt is a user message; print the assistant's reply")
  p.add_argument("--system", default="", help="with --chat: a system message before each prompt")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  if args.system and not args.chat:
    p.error("--system needs --chat")
  if bool(args.prompt) == bool(args.prompts_file):
    p.error("give --prompt (repeatable) or --prompts-file")
  if bool(args.prompts_file) != bool(args.out):
    p.error("--prompts-file and --out go together")
  if args.batch_size < 1:
    p.error("--batch-size must be >= 1")
  cfg, params, step = checkpoint.load_run(args.workdir, args.step)
  tok = workdir_tokenizer(args.workdir)
  formatter = chat.formatter(tok) if args.chat else None
  if args.prompts_file:
    _serve_file(args, cfg, params, step, tok, formatter)
    return
  prompts = _encode(args.prompt, [args.system] * len(args.prompt), tok, formatter)
  out = _generate(args, cfg, params, tok, formatter, prompts)
  if formatter is not None:
    _print_replies(step, [formatter.split_reply(ids) for ids in out], out, args.json)
    return
  texts = [text + tok.continuation(ids[1:], new)
           for text, ids, new in zip(args.prompt, prompts, out)]
  if args.json:
    print(json.dumps({"step": step, "completions": texts, "new_tokens": [len(o) for o in out]}))
  else:
    for text in texts:
      print(text, end="\n\n")


def _encode(texts, systems, tok, formatter) -> list[list[int]]:
  if formatter is not None:
    return [formatter.prompt(text, system) for text, system in zip(texts, systems)]
  return [[tok.bos_id, *tok.encode(text)] for text in texts]


_said_clamped = set()


def _generate(args, cfg, params, tok, formatter, prompts, pad_to: int = 0) -> list[list[int]]:
  """The new tokens of each prompt; fewer than --max-new-tokens where the context ends (said
  once)."""
  longest = max(pad_to, *map(len, prompts))
  room = cfg.model.max_seq_len - longest
  if room < 1:
    raise errors.UsageError(f"a prompt of {longest} tokens fills the model's context of "
                            f"{cfg.model.max_seq_len} tokens")
  if args.max_new_tokens > room and room not in _said_clamped:
    _said_clamped.add(room)
    print(f"note: --max-new-tokens {args.max_new_tokens} does not fit the model's context of "
          f"{cfg.model.max_seq_len} tokens after a prompt of {longest}: generating at most {room}",
          file=sys.stderr)
  return generate.generate(cfg.model, params, prompts, min(args.max_new_tokens, room),
                           args.temperature, args.top_k, args.top_p, args.seed,
                           pad_id=tok.pad_id, pad_to=pad_to,
                           eos_id=formatter.stop_ids if formatter else tok.eos_id)


def _read_prompts(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UsageError(f"{path}:{n}: not a JSON object ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise errors.UsageError(f'{path}:{n}: each line needs {{"prompt": "..."}}')
      rows.append(row)
  if not rows:
    raise errors.UsageError(f"{path} holds no prompts")
  return rows


def _serve_file(args, cfg, params, step, tok, formatter) -> None:
  """Every prompt of --prompts-file, in batches of --batch-size, into --out in order. The
  prompts of a batch are padded to a multiple of 1/32 of the context, so that batches share
  compiled programs; the output is written beside --out and renamed when complete."""
  rows = _read_prompts(args.prompts_file)
  bucket = max(8, cfg.model.max_seq_len // 32)  # at most 32 prompt lengths to compile for
  settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
  partial = f"{args.out}.partial"
  with open(partial, "w", encoding="utf-8") as out, \
      tqdm.tqdm(total=len(rows), unit="prompt", desc="generating") as bar:
    for start in range(0, len(rows), args.batch_size):
      batch = rows[start:start + args.batch_size]
      prompts = _encode([r["prompt"] for r in batch],
                        [r.get("system", args.system) for r in batch], tok, formatter)
      fill = args.batch_size - len(prompts)  # the last batch: padded with copies, dropped
      pad_to = min(-(-max(map(len, prompts)) // bucket) * bucket, cfg.model.max_seq_len - 1)
      new = _generate(args, cfg, params, tok, formatter, prompts + [prompts[0]] * fill,
                      pad_to)[:len(prompts)]
      for row, ids, tokens in zip(batch, prompts, new):
        result = {"prompt": row["prompt"], "new_tokens": len(tokens), "step": step, **settings}
        if formatter is not None:
          result["reasoning"], result["reply"] = formatter.split_reply(tokens)
        else:
          result["completion"] = tok.continuation(ids[1:], tokens)
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
      bar.update(len(batch))
  os.replace(partial, args.out)


def _print_replies(step: int, replies: list[tuple[str, str]], out: list[list[int]],
                   as_json: bool) -> None:
  if as_json:
    print(json.dumps({"step": step, "replies": [text for _, text in replies],
                      "reasoning": [reasoning for reasoning, _ in replies],
                      "new_tokens": [len(o) for o in out]}))
    return
  for reasoning, text in replies:
    if reasoning:
      print(f"[reasoning] {reasoning}")
    print(text, end="\n\n")


if __name__ == "__main__":
  errors.cli(main)

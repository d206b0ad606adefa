"""Continues prompts with a trained run's model (KV-cache decoding), or answers them as a chat.

  python scripts/generate.py --workdir runs/ts --prompt "Once upon a time" [--prompt ...]
      [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
  python scripts/generate.py --workdir runs/ts_chat --chat --prompt "Tell me a story."
      [--system "You are a storyteller."]

Temperature 0 is greedy. Each prompt is encoded as [BOS] + text, like the training documents;
generation stops at EOS or after --max-new-tokens. With --chat (a model fine-tuned on
data.format='chat'), each prompt is a user turn (after a system turn with --system) and the
assistant's turn is started; generation stops at its end of turn, and the assistant's reply is
printed, its reasoning (<think> ... </think>, if it wrote some) on a line of its own before it.
"""

from __future__ import annotations

import argparse
import json

from nanollama_jax import checkpoint, errors, generate
from nanollama_jax.data import chat
from nanollama_jax.data.tokenizer_source import workdir_tokenizer


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
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
  cfg, params, step = checkpoint.load_run(args.workdir, args.step)
  tok = workdir_tokenizer(args.workdir)
  formatter = chat.formatter(tok) if args.chat else None
  if formatter is not None:
    prompts = [formatter.prompt(text, args.system) for text in args.prompt]
  else:
    prompts = [[tok.bos_id, *tok.encode(text)] for text in args.prompt]
  max_new = min(args.max_new_tokens, cfg.model.max_seq_len - max(map(len, prompts)))
  if max_new < 1:
    raise errors.UsageError(f"the prompt fills the model's context of {cfg.model.max_seq_len} "
                            "tokens")
  out = generate.generate(cfg.model, params, prompts, max_new, args.temperature, args.top_k,
                          args.top_p, args.seed, pad_id=tok.pad_id,
                          eos_id=formatter.stop_ids if formatter else tok.eos_id)
  if formatter is not None:
    _print_replies(step, [formatter.split_reply(ids) for ids in out], out, args.json)
    return
  texts = [text + tok.continuation(ids[1:], new) for text, ids, new in zip(args.prompt, prompts, out)]
  if args.json:
    print(json.dumps({"step": step, "completions": texts, "new_tokens": [len(o) for o in out]}))
  else:
    for text in texts:
      print(text, end="\n\n")


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

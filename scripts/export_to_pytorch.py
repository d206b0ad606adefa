"""Exports a trained run as a Hugging Face Llama directory (safetensors + tokenizer).

  python scripts/export_to_pytorch.py --workdir runs/ts --out hf_model [--step N]
      [--dtype float32|bfloat16]

The result loads with transformers.LlamaForCausalLM.from_pretrained("hf_model") and
AutoTokenizer.from_pretrained("hf_model"). Needs the hf extra: pip install -e ".[hf]".
"""

from __future__ import annotations

import argparse
import json
import os

from nanollama_jax import checkpoint, errors, export
from nanollama_jax.data.tokenizer_source import workdir_tokenizer


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--out", required=True, help="the Hugging Face directory to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face")
  cfg, params, step = checkpoint.load_run(args.workdir, args.step)
  tok = workdir_tokenizer(args.workdir)
  export.save_hf(args.out, params, cfg.model, tok, args.dtype)
  files = sorted(os.listdir(args.out))
  if args.json:
    print(json.dumps({"step": step, "out": args.out, "files": files}))
  else:
    print(f"exported step {step} of {args.workdir} to {args.out}: {', '.join(files)}")


if __name__ == "__main__":
  errors.cli(main)

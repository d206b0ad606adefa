"""A scaling-law sweep: model sizes x token budgets from one recipe, each an ordinary run, then a fit
of L(N, D) = E + A / N^alpha + B / D^beta and the compute-optimal N and D.

  python scripts/scaling_sweep.py --base configs/tinystories_cpu.py --sizes 32,64,128 \\
      --tokens 128k,256k,512k --out sweeps/toy [--data-files GLOB] [--eval-files GLOB]
      [--batch-size N] [--budget FLOPS] [--bootstrap N] [--json]

--sizes are model widths (the recipe's width and depth scaled together, see
nanollama_jax/scaling.py); --tokens are training budgets (k, M, B suffixes). Each run trains in
OUT/d<size>_<tokens>/; rerunning the command resumes an interrupted run and skips finished
ones. Writes OUT/scaling.json (every run and the fit) and OUT/scaling.png (loss against
compute). The data default to the TinyStories sample shipped with the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nanollama_jax import data, errors, recipe, scaling


def summary(doc: dict) -> str:
  """The runs as a Markdown table, then the fitted law with its bootstrap intervals."""
  lines = ["| run | layers | N (non-embedding) | tokens | steps | validation loss | time |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in doc["runs"]:
    took = f"{r['train_s']:.0f}s" if r["train_s"] is not None else "-"
    lines.append(f"| {r['name']} | {r['n_layers']} | {r['params_non_embedding']:,} | "
                 f"{r['tokens']:,} | {r['steps']} | {r['eval_loss']:.4f} | {took} |")
  f = doc["fit"]
  spread = f.get("bootstrap", {})

  def show(name: str, fmt: str) -> str:
    ci = spread.get(name)
    interval = f" [{ci['p5']:{fmt}}, {ci['p95']:{fmt}}]" if ci else ""
    return f"{name} = {f[name]:{fmt}}{interval}"

  lines += ["", f"fit ({f['law']}; 90% bootstrap intervals over {spread.get('samples', 0)} "
            "resamples of the runs):",
            "  " + ", ".join(show(k, ".3g") for k in ("E", "A", "B", "alpha", "beta")),
            f"compute-optimal at C = {f['budget_flops']:.3g} FLOPs (6ND): "
            f"{show('N_opt', '.3g')}, {show('D_opt', '.3g')}, loss {f['loss_opt']:.4f}"]
  return "\n".join(lines)


def grid_table(runs: list[scaling.Run]) -> str:
  """The runs a sweep would train, as a Markdown table (--dry-run)."""
  lines = ["| run | layers | heads | N (non-embedding) | tokens | steps | 6ND FLOPs |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in runs:
    m = r.cfg.model
    lines.append(f"| {r.name} | {m.n_layers} | {m.n_heads} / {m.n_kv_heads} | {r.params:,} | "
                 f"{r.tokens:,} | {r.cfg.train.steps} | {r.compute:.3g} |")
  return "\n".join(lines + [f"dry run: {len(runs)} runs; nothing was trained"])


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--base", required=True, help="the recipe to scale (a configs/*.py file)")
  p.add_argument("--sizes", required=True, help="comma-separated model widths, e.g. 32,64,128")
  p.add_argument("--tokens", required=True, help="comma-separated token budgets, e.g. 128k,1M")
  p.add_argument("--out", required=True, help="the sweep's directory")
  sample = data.sample_dir()
  p.add_argument("--data-files", default=str(sample / "train.jsonl"),
                 help="training files, comma-separated globs (default: the shipped sample)")
  p.add_argument("--eval-files", default=str(sample / "validation.jsonl"),
                 help="validation files (default: the shipped sample's validation split)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="global batch in sequences (default: the recipe's)")
  p.add_argument("--budget", type=float, default=None,
                 help="FLOPs for the compute-optimal N and D (default: 10x the largest run)")
  p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of the runs")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  p.add_argument("--dry-run", action="store_true",
                 help="print the grid of runs (layers, N, steps) and exit without training")
  args = p.parse_args(argv)
  base = recipe.load(args.base)
  if args.batch_size is not None:
    base.data.batch_size = args.batch_size
  try:
    dims = [int(s) for s in args.sizes.split(",") if s.strip()]
  except ValueError as e:
    raise errors.UsageError(f"--sizes {args.sizes}: comma-separated integers") from e
  budgets = [scaling.parse_count(s) for s in args.tokens.split(",") if s.strip()]
  if args.dry_run:
    print(grid_table(scaling.grid(base, dims, budgets, "", args.data_files, args.eval_files)))
    return
  doc = scaling.sweep(base, dims, budgets, args.out, args.data_files, args.eval_files,
                      say=lambda line: print(line, file=sys.stderr, flush=True),
                      bootstrap=args.bootstrap, budget_flops=args.budget)
  if args.json:
    print(json.dumps(doc))
  else:
    print(f"{summary(doc)}\nwrote {os.path.join(args.out, scaling.RESULTS)} and "
          f"{os.path.join(args.out, scaling.FIGURE)}")


if __name__ == "__main__":
  errors.cli(main)

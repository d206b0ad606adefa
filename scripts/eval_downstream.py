"""Downstream accuracy of a trained run on lm-evaluation-harness tasks, served by our JAX model.

  python scripts/eval_downstream.py --workdir runs/ts --tasks hellaswag,arc_easy,piqa,winogrande
      [--limit N] [--include-path DIR] [--step N] [--batch-size N] [--json]

Prints a table per task (accuracy, normalised accuracy, their standard errors, and any other
metric the task defines) and writes the harness's results to WORKDIR/downstream/step_<N>.json.
The harness's own tasks download their datasets from the Hugging Face Hub; tasks of your own are
YAML files under --include-path (see docs/evaluation.md). Needs lm-eval: pip install -e ".[eval]".
"""

from __future__ import annotations

import argparse
import json
import os

from nanollama_jax import errors


def table(metrics: dict[str, dict[str, float]], samples: dict[str, int]) -> str:
  """A Markdown table: one row per task and metric, with its standard error."""
  lines = ["| task | n | metric | value | stderr |", "| --- | --- | --- | --- | --- |"]
  for task, values in metrics.items():
    for name in (k for k in values if not k.endswith("_stderr")):
      stderr = values.get(f"{name}_stderr")
      shown = f"{stderr:.4f}" if isinstance(stderr, float) else "-"
      n = samples.get(task, "-")
      lines.append(f"| {task} | {n} | {name} | {values[name]:.4f} | {shown} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--tasks", required=True, help="comma-separated harness task names")
  p.add_argument("--limit", type=float, default=None,
                 help="documents per task (a fraction below 1); for quick checks, not for reporting")
  p.add_argument("--include-path", default=None, help="a directory of task YAML files of your own")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--batch-size", type=int, default=16, help="sequences per model call")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  from nanollama_jax import harness  # pylint: disable=import-outside-toplevel
  try:
    results = harness.evaluate(args.workdir, tasks, limit, args.include_path, args.step,
                               args.batch_size)
  except ConnectionError as e:
    raise errors.NetworkError(
      f"a task's dataset could not be downloaded ({e}); use tasks whose data is local "
      "(--include-path) on a machine without the Hugging Face Hub") from e
  step = results["config"]["step"]
  out = os.path.join(args.workdir, "downstream", f"step_{step}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(harness.results_json(results))
  metrics = harness.metrics_by_task(results)
  samples = {t: n["effective"] for t, n in results.get("n-samples", {}).items()}
  if args.json:
    print(json.dumps({"step": step, "results": metrics, "samples": samples, "file": out}))
  else:
    print(f"step {step} of {args.workdir}:\n{table(metrics, samples)}\nwrote {out}")


if __name__ == "__main__":
  errors.cli(main)

"""Plots a run's train and validation loss against tokens seen, with the learning rate under it.

  python scripts/plot_metrics.py --workdir runs/ts --out loss.png [--title "TinyStories 33M"]

Reads WORKDIR/metrics.jsonl (one JSON object per logged step). Needs matplotlib:
pip install -e ".[plot]".
"""

from __future__ import annotations

import argparse
import os

from nanollama_jax import errors
from nanollama_jax import workdir as workdir_lib



def read_metrics(workdir: str) -> list[dict]:
  """The run's metrics rows; CheckpointError if it is not a run or logged no loss yet."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS)
  if not os.path.isfile(path):
    raise errors.CheckpointError(f"{path}: no such file (is {workdir} a training workdir?)")
  rows = workdir_lib.read_metrics(workdir)
  if not any("loss" in r for r in rows):
    raise errors.CheckpointError(f"{path}: no training loss logged yet")
  return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
  """(tokens seen, value) of the rows that have `key`; eval rows take the tokens of their step."""
  tokens_at = {r["step"]: r["tokens_seen"] for r in rows if "tokens_seen" in r}
  xs, ys = [], []
  for r in rows:
    if key in r and r["step"] in tokens_at:
      xs.append(tokens_at[r["step"]])
      ys.append(r[key])
  return xs, ys


def plot(rows: list[dict], out: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_loss, ax_lr) = plt.subplots(
    2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  ax_loss.plot(*series(rows, "loss"), label="train loss", color="tab:blue")
  eval_x, eval_y = series(rows, "eval_loss")
  if eval_x:
    ax_loss.plot(eval_x, eval_y, "o-", label="validation loss", color="tab:orange")
  ax_loss.set_ylabel("cross-entropy (nats/token)")
  ax_loss.set_title(title)
  ax_loss.grid(alpha=0.3)
  ax_loss.legend()
  ax_lr.plot(*series(rows, "lr"), color="tab:green")
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("tokens seen")
  ax_lr.grid(alpha=0.3)
  ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--out", required=True, help="the image to write (.png, .svg, .pdf)")
  p.add_argument("--title", default=None, help="default: the workdir's name")
  args = p.parse_args(argv)
  rows = read_metrics(args.workdir)
  errors.require(errors.MODULES["plot"], "plot", "plotting")
  plot(rows, args.out, args.title or os.path.basename(os.path.normpath(args.workdir)))
  last = [r for r in rows if "loss" in r][-1]
  print(f"Wrote {args.out}: {sum('loss' in r for r in rows)} train and "
        f"{sum('eval_loss' in r for r in rows)} validation points, last train loss "
        f"{last['loss']:.4f} at {last['tokens_seen']:,} tokens")


if __name__ == "__main__":
  errors.cli(main)

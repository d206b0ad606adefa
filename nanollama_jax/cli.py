"""`python -m nanollama_jax.train --config CONFIG.py --workdir DIR`: flags, usage and exit codes.

The recipe and its `--config.GROUP.FIELD=VALUE` overrides are read by recipe.load; the other
flags by absl. Errors follow errors.py: one line and exit 2 for the user's mistakes, 1 for a run
that failed, 128 + N after a signal.
"""

from __future__ import annotations

import logging as std_logging
import os
import shlex
import sys

from absl import app, flags, logging

from nanollama_jax import checkpoint, errors, hostmem, model, recipe, sharding, train
from nanollama_jax import config as config_lib
from nanollama_jax.errors import HubUnreachable

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "host:port of process 0 of a multi-process run (GPU clusters, several processes on one "
  "machine); default $JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", sharding.env_int("JAX_NUM_PROCESSES"),
  "Processes in the run, with --coordinator_address; default $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", sharding.env_int("JAX_PROCESS_ID"),
  "This process's index, with --coordinator_address; default $JAX_PROCESS_ID.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False,
  "Join a multi-process run whose layout JAX reads from the environment (every worker of a "
  "TPU pod slice, a SLURM or Open MPI job). Implied by --coordinator_address.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False,
  "Validate the config, its files and the flags, print what the run would train, and exit "
  "without touching the workdir, the network or the devices.")

USAGE = """\
usage: python -m nanollama_jax.train --config CONFIG.py --workdir DIR [--config.GROUP.FIELD=VALUE ...]

Trains the model of CONFIG.py in DIR, or resumes the run DIR holds. Every config field, with its
default and a comment, is defined in nanollama_jax/config.py (get_default_config); the recipes in
configs/ change only what differs. Groups: model, data, optim, train, mesh, wandb.

Common overrides:
  --config.train.steps=200 --config.model.n_layers=2       a shorter run of a smaller model
  --config.data.source=files --config.data.train_files='data/*.jsonl' \\
      --config.data.eval_files=data/val.jsonl            local JSONL, text or Parquet files
  --config.model.attention=xla --config.model.dtype=float32  the portable attention, in float32

Exit codes: 0 done, 1 training failed, 2 the run could not start (a config, data, checkpoint,
network or install problem, named in one line), 128 + N stopped by signal N after saving a
checkpoint.
"""


class _Recipe:
  """The --config flag and its overrides, taken out of argv before absl parses the rest."""
  spec: str | None = None
  overrides: list[str] = []


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
  """(the --config value, the --config.X=Y overrides, the other arguments) of `argv`."""
  spec, overrides, rest, i = None, [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 2
      continue
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv):  # --config.a.b VALUE
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return spec, overrides, rest


def _parse_flags(argv: list[str]) -> list[str]:
  """Takes the recipe's flags out of argv and parses the rest with absl."""
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(USAGE + "\nflags:\n" + flags.FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  _Recipe.spec, _Recipe.overrides, rest = split_config_args(argv)
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:  # before main, so outside errors.cli: the same line and code
    error = errors.UsageError(f"{' '.join(str(e).split())} (see --help)")
    print(error.line(), file=sys.stderr)
    sys.exit(error.exit_code)


def dry_run(cfg) -> str:
  """What `cfg` would train, in one line; raises ConfigError like a real run would."""
  config_lib.validate(cfg)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  data = (f"the Hub dataset {cfg.data.hf_path}" if cfg.data.source == "hf" and not cfg.data.mixture
          else "a mixture" if cfg.data.mixture else f"files {cfg.data.train_files}")
  return (f"dry run: the config is valid: {model.param_count_formula(cfg.model):,} parameters, "
          f"{tokens_per_step:,} tokens per step x {cfg.train.steps:,} steps = "
          f"{tokens_per_step * cfg.train.steps:,} tokens from {data}; nothing was trained")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (dozens of lines per save), JAX's start-up notes (such as
  "Unable to initialize backend 'tpu'" on every machine without one) and, in a gs:// workdir,
  fsspec's and gcsfs's (a line for every file orbax reads); warnings still show. The tracebacks
  of a save that found the disk full (orbax's threads, asyncio's unretrieved tasks) are dropped
  too: the run says that in one line (checkpoint.Checkpointer)."""

  _CHATTY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}",
             f"{os.sep}fsspec{os.sep}", f"{os.sep}gcsfs{os.sep}")
  _ORBAX = f"{os.sep}orbax{os.sep}"

  def filter(self, record: std_logging.LogRecord) -> bool:
    if ((self._ORBAX in record.pathname and "No space left on device" in record.getMessage())
        or (record.exc_info and checkpoint.is_disk_full(record.exc_info[1]))):
      return False
    return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in self._CHATTY)


def _drop_abandoned_orbax_writes(unraisable) -> None:
  """sys.unraisablehook: when an asynchronous save fails (a full disk), orbax abandons its other
  writes, whose coroutines and callbacks then find their event loop closed; Python prints each as
  a traceback, which says nothing the run's own error line does not. Those are logged at debug
  level; every other unraisable exception is printed as usual."""
  code = getattr(unraisable.object, "cr_code", None)
  orbax = code is not None and _QuietLibraries._ORBAX in code.co_filename  # pylint: disable=protected-access
  closed = (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")
  if orbax or closed:
    logging.debug("abandoned asynchronous write: %r", unraisable.exc_value)
    return
  sys.__unraisablehook__(unraisable)


def offline_command(workdir: str) -> str:
  """The training command of this run on the TinyStories sample that ships with the package."""
  from nanollama_jax.data import sample_dir  # pylint: disable=import-outside-toplevel
  sample = str(sample_dir())
  if sample.startswith(os.getcwd() + os.sep):
    sample = os.path.relpath(sample)
  keep = [o for o in _Recipe.overrides if not o.startswith("--config.data.")]
  args = ["python", "-m", "nanollama_jax.train", "--config", _Recipe.spec, "--workdir", workdir,
          *keep, "--config.data.source=files",
          f"--config.data.train_files={os.path.join(sample, 'train.jsonl')}",
          f"--config.data.eval_files={os.path.join(sample, 'validation.jsonl')}"]
  return " ".join(shlex.quote(a) for a in args)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _drop_abandoned_orbax_writes
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (see --help)")
  if _Recipe.spec is None or _WORKDIR.value is None:
    raise errors.UsageError("both --config and --workdir are required (see --help)")
  cfg = recipe.load(_Recipe.spec, _Recipe.overrides)
  if _DRY_RUN.value:
    print(dry_run(cfg))
    return
  if cfg.train.keep_host_memory:
    hostmem.keep_freed_memory()  # before JAX starts its CPU backend's threads
  if _COORDINATOR.value or _MULTIHOST.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train(cfg, _WORKDIR.value)
  except HubUnreachable as e:
    raise HubUnreachable(f"{e}. To train offline on the TinyStories sample that ships with the "
                         f"package:\n  {offline_command(_WORKDIR.value)}") from e


def run() -> None:
  """The command line: absl parses the flags, errors.cli turns errors into one line."""
  app.run(lambda argv: errors.cli(lambda: main(argv)), flags_parser=_parse_flags)

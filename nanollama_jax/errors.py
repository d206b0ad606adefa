"""One error policy: every error a user can act on is an `Error` with a kind and an exit code.

Entry points (`python -m nanollama_jax.train`, `python -m nanollama_jax.hub`, scripts/) run
through `cli()`, which prints such an error as one line, `<kind>: <message>`, and exits with its
code: 2 for the user's mistakes (config, data, checkpoint, install, usage), 75 for a network or
storage service that failed and may work on a retry (sysexits' EX_TEMPFAIL: a supervisor such as
scripts/launch_tpu_pod.sh restarts it), 1 for a run that failed on its own (training error),
128 + N for a run stopped by signal N after saving. Anything else is a bug of ours and keeps its
traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class Error(Exception):
  """An error the user can act on; the message says what and how to fix it."""

  kind = "error"
  exit_code = 2

  def line(self) -> str:
    """The one line `cli()` prints."""
    return f"{self.kind}: {self}"


class ConfigError(Error, ValueError):
  """A config value, file or flag that cannot be used."""

  kind = "config error"


class UsageError(Error, ValueError):
  """Command-line arguments that cannot be used together or at all."""

  kind = "usage error"


class DataError(Error, ValueError):
  """Training or evaluation data that cannot be used; the message names the file, line and key."""

  kind = "data error"


class CheckpointError(Error):
  """A checkpoint or workdir that cannot be read or written as asked."""

  kind = "checkpoint error"


class NetworkError(Error, ConnectionError):
  """A remote service (the Hugging Face Hub, a bucket) cannot be reached; a retry may work."""

  kind = "network error"
  exit_code = 75  # EX_TEMPFAIL


class HubUnreachable(NetworkError, DataError):
  """The Hugging Face Hub cannot be reached to read a dataset: the network, not the config or
  the data (the training command then offers the offline sample)."""


class ExportError(CheckpointError):
  """A model, tokenizer or directory that the Hugging Face export cannot take."""


class TargetError(UsageError):
  """A target name that is not in the hardware tables, or a count that does not make a slice."""


class WorkdirHeld(UsageError):
  """Another run holds the workdir (lease.py)."""


class InstallError(Error, ImportError):
  """A feature needs a package that is not installed; the message gives the pip command."""

  kind = "install error"


class TrainingError(Error):
  """The run cannot go on (e.g. too many non-finite steps); the message names the step."""

  kind = "training error"
  exit_code = 1


class Preempted(Error):
  """SIGTERM or SIGINT stopped the run after a checkpoint was written."""

  def __init__(self, signum: int, step: int, where: str):
    self.signum = signum
    self.step = step
    self.exit_code = 128 + signum  # the shell's code for "stopped by this signal"
    super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} with a "
                     f"checkpoint in {where}; rerun the same command to resume")

  def line(self) -> str:
    return str(self)


# pip's name for the extras that features need, in one place so every message says the same.
EXTRAS = {
  "hf": "export to and import from Hugging Face, and pushes to the Hub",
  "plot": "plots of metrics and sweeps",
  "eval": "downstream benchmarks with lm-evaluation-harness",
  "gcs": "workdirs in Google Cloud Storage",
  "aot": "compiling for GPUs and TPUs without one",
  "wandb": "logging to Weights & Biases",
}
# The modules each extra's features import; `require(MODULES[extra], ...)` checks for all of them.
MODULES = {
  "hf": ("safetensors", "tokenizers", "transformers", "huggingface_hub"),
  "plot": ("matplotlib",),
  "eval": ("lm_eval",),
  "gcs": ("gcsfs", "google.cloud.storage"),
  "wandb": ("wandb",),
}
# The module of the aot extra that compiles for each platform: XLA's CUDA plugin, libtpu.
AOT_PLUGINS = {"cuda": "jax_cuda12_plugin", "tpu": "libtpu"}


def install_command(extra: str) -> str:
  """The pip command that installs `extra`, as every install message gives it."""
  return f"pip install 'nanollama_jax[{extra}]' (or pip install -e \".[{extra}]\" in a clone)"


def require(modules: tuple[str, ...], extra: str, feature: str) -> None:
  """Raises InstallError naming the pip command if any of `modules` is not installed."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  def installed(module: str) -> bool:
    try:
      return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
      return False
  missing = [m for m in modules if not installed(m)]
  if missing:
    raise InstallError(f"{feature} needs {', '.join(missing)}: {install_command(extra)}")


def cli(main: Callable[[], Any]) -> NoReturn:
  """Runs `main()` and exits: 0 (or main's int), or one line and the exit code of an Error.

  A missing file the user named (FileNotFoundError, NotADirectoryError, PermissionError with a
  file name) is also one line, `file error: ...`, exit 2.
  """
  try:
    code = main()
  except Error as e:
    print(e.line(), file=sys.stderr)
    sys.exit(e.exit_code)
  except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
    if e.filename is None:
      raise
    print(f"file error: {e.strerror}: {e.filename}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)

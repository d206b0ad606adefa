"""Reading a recipe: a config file (FILE or FILE:ARG) plus `--config.GROUP.KEY=VALUE` overrides.

The one loader of the training command, scripts/aot_compile.py and scripts/scaling_sweep.py; a
file that does not import is a ConfigError naming the file and line.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from nanollama_jax.config import check_key
from nanollama_jax.errors import ConfigError


def _in_file(error: BaseException, path: str) -> tuple[BaseException, int] | None:
  """The error (or one it was raised from) and its line in the file `path`; None if none."""
  seen: BaseException | None = error
  while seen is not None:
    if isinstance(seen, SyntaxError) and seen.filename and seen.lineno:
      if os.path.abspath(seen.filename) == os.path.abspath(path):
        return seen, seen.lineno
    lines = [f.lineno for f in traceback.extract_tb(seen.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    if lines:
      return seen, lines[-1]
    seen = seen.__cause__ or seen.__context__
  return None


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The recipe `spec` (FILE or FILE:ARG) with `--config.group.key=value` overrides applied.

  Raises ConfigError for a missing file, an unknown key, a bad value, or a file that does not
  import or whose get_config fails (naming the file and line). Not validated: call validate().
  """
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config {spec}: no such file (the recipes are in configs/)")
  for arg in overrides:
    if not arg.startswith("--config."):
      raise ConfigError(f"unexpected argument {arg!r}: overrides are --config.GROUP.KEY=VALUE")
    check_key(arg[len("--config."):].split("=", 1)[0])
  argv = ["nanollama_jax", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the recipe", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    return values.config
  except Exception as e:  # pylint: disable=broad-except  # the recipe's code or an override
    found = _in_file(e, path)
    if found is None:
      raise ConfigError(" ".join(str(e).split())) from e  # an override's key or value
    cause, line = found
    message = cause.msg if isinstance(cause, SyntaxError) else str(cause)
    raise ConfigError(f"{path}, line {line}: {type(cause).__name__}: {message}") from e

"""The data-source grammar of a config: file globs, Hub datasets and weighted mixtures.

Below config.py (which validates with it) and data/ (which reads with it); imports neither.
"""

from __future__ import annotations

import dataclasses
import glob
import os

from nanollama_jax.errors import ConfigError


def expand_globs(patterns: str, key: str) -> list[str]:
  """Returns the sorted files matching comma-separated globs; an error names the key if none."""
  files: list[str] = []
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise ConfigError(f"{key}={patterns!r}: no file matches {pattern!r}")
    files.extend(m for m in matches if m not in files)
  if not files:
    raise ConfigError(f"{key} is empty: give one or more comma-separated file globs")
  return files


HUB_PREFIX = "hf:"  # a data.mixture entry read from the Hugging Face Hub


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A Hub dataset in a mixture: "hf:PATH[:NAME][@SPLIT][#TEXT_KEY]"."""
  path: str
  name: str | None = None
  split: str = "train"
  text_key: str | None = None  # None: data.text_key


def parse_hub_source(entry: str) -> HubSource:
  """Parses a mixture entry "hf:PATH[:NAME][@SPLIT][#TEXT_KEY]", e.g.
  "hf:HuggingFaceFW/fineweb-edu:sample-10BT@train#text"."""
  body, has_key, text_key = entry.removeprefix(HUB_PREFIX).partition("#")
  body, has_split, split = body.partition("@")
  path, has_name, name = body.partition(":")
  if not path or any(marker and not value for marker, value in
                     ((has_name, name), (has_split, split), (has_key, text_key))):
    raise ConfigError(f"data.mixture entry {entry!r} is not hf:PATH[:NAME][@SPLIT][#TEXT_KEY], "
                      "e.g. 'hf:HuggingFaceFW/fineweb-edu:sample-10BT@train#text'")
  return HubSource(path, name or None, split or "train", text_key or None)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """Parses data.mixture, "SOURCE=WEIGHT;SOURCE=WEIGHT", into (source, weight) pairs.

  A source is comma-separated file globs or pretokenized dataset directories (like
  data.train_files), or a Hub dataset "hf:PATH[:NAME][@SPLIT][#TEXT_KEY]" (see HubSource).
  """
  parts = []
  for entry in (e.strip() for e in spec.split(";")):
    if not entry:
      continue
    globs, sep, weight = entry.rpartition("=")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not sep or not globs.strip() or not value > 0:
      raise ConfigError(
        f"data.mixture={spec!r}: entry {entry!r} is not SOURCE=WEIGHT with a weight > 0, "
        "e.g. 'web/*.jsonl=0.7;hf:HuggingFaceFW/fineweb-edu:sample-10BT=0.3'")
    if globs.strip().startswith(HUB_PREFIX):
      parse_hub_source(globs.strip())
    parts.append((globs.strip(), value))
  if not parts:
    raise ConfigError(f"data.mixture={spec!r}: no entries")
  return parts

"""Files from the Hugging Face Hub: `hf:ORG/NAME[@REVISION]` names, a probe that tells a network
that is down from a wrong name within seconds, and downloads of chosen files of a repository.

Published tokenizers (`data.tokenizer`) and weights (`train.init_from`) are named this way. A
download goes to huggingface_hub's cache (HF_HOME), is reused from there, and reads HF_TOKEN for
gated repositories such as Meta's. With HF_HUB_OFFLINE=1 only the cache is read.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from nanollama_jax import errors

PREFIX = "hf:"
PROBE_TIMEOUT_S = 5.0
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(spec: str) -> bool:
  """Whether `spec` names a Hub repository (`hf:ORG/NAME[@REVISION]`) rather than a path."""
  return str(spec).startswith(PREFIX)


def parse(spec: str, key: str) -> tuple[str, str | None]:
  """(repository id, revision or None) of `hf:ORG/NAME[@REVISION]`; ConfigError names `key`."""
  repo, _, revision = spec[len(PREFIX):].partition("@")
  if not _REPO.fullmatch(repo) or (revision == "" and "@" in spec):
    raise errors.ConfigError(f"{key}={spec!r}: a Hub name is hf:ORG/NAME or hf:ORG/NAME@REVISION "
                             "(a branch, tag or commit), e.g. hf:meta-llama/Llama-3.2-1B")
  return repo, revision or None


def probe(what: str) -> None:
  """Raises NetworkError within seconds when the Hub cannot be reached to read `what`.

  huggingface_hub and datasets retry for tens of seconds before they give up; one HTTP request
  to the endpoint (proxies honoured) answers first. Skipped with HF_HUB_OFFLINE=1.
  """
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  if constants.HF_HUB_OFFLINE:
    return
  reason = unreachable(constants.ENDPOINT)
  if reason:
    raise errors.NetworkError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to read "
                              f"{what} ({reason}): the network is down or blocked")


def unreachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
  """Why the server at `url` does not answer one HEAD request within `timeout_s`, or None when it
  answers (an HTTP error status is an answer: the network is fine). Proxies are honoured."""
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
  except urllib.error.HTTPError:
    return None
  except (OSError, ValueError) as e:
    return str(getattr(e, "reason", e))
  return None


def download(spec: str, patterns: list[str], key: str, local_hint: str) -> str:
  """Downloads the files of `spec` that match `patterns` (globs); returns their local directory.

  Errors are one line that names `key`: a repository that does not exist or is gated (with what
  to do), a revision that does not exist, or a network that is down (NetworkError, which says
  `local_hint`: how to do without the Hub).
  """
  repo, revision = parse(spec, key)
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors as hub_errors  # pylint: disable=import-outside-toplevel

  try:
    probe(f"{key}={spec!r}")
  except errors.NetworkError as e:
    raise errors.NetworkError(f"{e}. {local_hint}") from None
  try:
    return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns)
  except hub_errors.GatedRepoError:
    raise errors.ConfigError(
      f"{key}={spec!r}: {repo} is gated: accept its licence on https://huggingface.co/{repo} and "
      f"set HF_TOKEN to a token of that account (or `hf auth login`). {local_hint}") from None
  except hub_errors.RepositoryNotFoundError:
    raise errors.ConfigError(
      f"{key}={spec!r}: no repository {repo} on the Hub (or a private one: set HF_TOKEN). "
      f"{local_hint}") from None
  except hub_errors.RevisionNotFoundError:
    raise errors.ConfigError(f"{key}={spec!r}: {repo} has no revision {revision!r}") from None
  except hub_errors.LocalEntryNotFoundError:
    raise errors.NetworkError(
      f"{key}={spec!r}: not in the local cache, and the Hub was not asked (HF_HUB_OFFLINE=1, or "
      f"the connection failed). {local_hint}") from None
  except OSError as e:  # the Hub's HTTP errors and dropped connections are OSErrors
    raise errors.NetworkError(f"{key}={spec!r}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}. {local_hint}") from None

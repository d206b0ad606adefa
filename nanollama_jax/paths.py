"""The files of a run's workdir through one path layer: local paths, and object stores.

A workdir may be a local directory or, on TPU VMs and clusters, a bucket such as
`gs://bucket/runs/x`: orbax writes checkpoints there itself, and everything else the run keeps
(config, tokenizer, metrics, TensorBoard events, damaged checkpoints set aside) goes through the
functions here, built on `etils.epath` (the layer orbax uses; `gs://` needs `gcsfs` or
TensorFlow installed, and TensorBoard's event files `google-cloud-storage`).

Object stores differ from disks in two ways that matter here: an object is written whole or not
at all (so no temporary file and rename is needed), and it cannot be appended to (so
metrics.jsonl is rewritten whole; see tracking.Jsonl).
"""

from __future__ import annotations

import os

from etils import epath

from nanollama_jax import errors

REMOTE_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` lies in an object store (gs://, s3://, az://) rather than on a disk."""
  return str(path).startswith(REMOTE_PREFIXES)


def check_backend(path: str | os.PathLike) -> None:
  """Raises InstallError when `path` is in Cloud Storage and the gcs extra is not installed."""
  if str(path).startswith("gs://"):
    errors.require(errors.MODULES["gcs"], "gcs", f"a workdir in Cloud Storage ({path})")


def resolve(path: str | os.PathLike) -> str:
  """`path` made absolute if it is local (orbax refuses relative paths); URIs as they are."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  return str(epath.Path(base).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in directory `path`; none when it does not exist."""
  p = epath.Path(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `path` whole or not at all: on a disk through a temporary file and a rename, in an
  object store in one write (objects appear complete)."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    p.write_bytes(raw)
    return
  tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
  tmp.write_bytes(raw)
  tmp.replace(p)


def remove(path: str | os.PathLike) -> None:
  """Removes a file or a whole directory tree."""
  p = epath.Path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or a directory tree.

  In an object store, object by object, by the store itself (gcsfs moves or copies each object
  server-side): a "directory" there is a prefix that cannot be renamed at once, and one that holds
  no object does not exist, so epath's rename refuses to move anything into it.
  """
  if is_remote(src):
    import fsspec  # pylint: disable=import-outside-toplevel  # comes with every store's client
    fs, src_key = fsspec.url_to_fs(str(src))
    fs.mv(src_key, fsspec.url_to_fs(str(dst))[1], recursive=True)
    return
  d = epath.Path(dst)
  d.parent.mkdir(parents=True, exist_ok=True)
  epath.Path(src).rename(d)

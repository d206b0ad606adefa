"""Where a run's tokenizer comes from, and the copy of it that the run's workdir keeps.

`data.tokenizer` names one of:

  a sentencepiece model     any file name (tokenizer.model, Mistral's tokenizer.model.v3)
  a tokenizer.json          with tokenizer_config.json, special_tokens_map.json and
                            chat_template.jinja read from beside it where present
  a directory               holding either (a Hugging Face model directory, a workdir, a
                            pretokenized dataset); tokenizer.json is read where both are, as
                            transformers' AutoTokenizer does
  hf:ORG/NAME[@REVISION]    those files of a Hub repository (HF_TOKEN for gated ones)

local paths and gs:// alike. Empty: the tokenizer of the weights the run starts from
(train.init_from), else of the pretokenized training dataset, else one trained on the corpus.

The workdir keeps the tokenizer's own files at its top (tokenizer.model, or tokenizer.json and
its configuration), so every script reads the run's tokenizer from the workdir, and a resumed
run refuses a data.tokenizer whose files differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ml_collections
from absl import logging

from nanollama_jax import errors, hf_files, paths
from nanollama_jax.errors import DataError
from nanollama_jax.data import hf_tokenizer, records, sources, spm_tokenizer
from nanollama_jax.data.hf_tokenizer import HFTokenizer
from nanollama_jax.data.spm_tokenizer import SentencePieceTokenizer
from nanollama_jax.data.tokenizer import Tokenizer

# Every file a tokenizer may consist of (what a Hub download fetches, what a workdir keeps).
FILES = (*hf_tokenizer.FILES, spm_tokenizer.MODEL_FILE)


def _from_files(files: dict[str, bytes], source: str) -> Tokenizer:
  if hf_tokenizer.TOKENIZER_JSON in files:
    return HFTokenizer(files, source)
  tokenizer = SentencePieceTokenizer(files[spm_tokenizer.MODEL_FILE], source)
  spm_tokenizer.check_bos_eos(tokenizer)
  return tokenizer


def _read(directory: str, names: tuple[str, ...]) -> dict[str, bytes]:
  """The files of `names` that `directory` holds."""
  present = set(paths.listdir(directory))
  return {name: paths.read_bytes(paths.join(directory, name)) for name in names if name in present}


def load_dir(directory: str) -> Tokenizer | None:
  """The tokenizer a directory holds (tokenizer.json first, then tokenizer.model); None if none."""
  files = _read(directory, FILES)
  if hf_tokenizer.TOKENIZER_JSON in files:
    return HFTokenizer({k: v for k, v in files.items() if k in hf_tokenizer.FILES}, directory)
  if spm_tokenizer.MODEL_FILE in files:
    return _from_files({spm_tokenizer.MODEL_FILE: files[spm_tokenizer.MODEL_FILE]}, directory)
  return None


def _no_hub_hint(spec: str, vocab_size: int | None) -> str:
  return (f"Without the Hub: copy the repository's tokenizer files (tokenizer.json and "
          f"tokenizer_config.json, or tokenizer.model) to a directory and set data.tokenizer to "
          f"it, or train this project's own instead of {spec}: python scripts/train_tokenizer.py "
          f"--input 'YOUR_TEXT/*.jsonl' --vocab-size {vocab_size or 'N'} --out tokenizer.model, "
          "then --config.data.tokenizer=tokenizer.model (or leave it empty: the run trains one on "
          "its data)")


def load(spec: str, key: str = "data.tokenizer", vocab_size: int | None = None) -> Tokenizer:
  """The tokenizer `spec` names (see the module docstring); errors are one line naming `key`
  (and, when the Hub cannot be reached, the command that trains a tokenizer of `vocab_size`)."""
  if hf_files.is_hub_name(spec):
    directory = hf_files.download(spec, list(FILES), key, _no_hub_hint(spec, vocab_size))
    tokenizer = load_dir(directory)
    if tokenizer is None:
      raise DataError(f"{key}={spec!r}: the repository has no tokenizer.json or tokenizer.model")
    tokenizer.source = spec
    return tokenizer
  if paths.isdir(spec):
    tokenizer = load_dir(spec)
    if tokenizer is None:
      files = ", ".join(paths.listdir(spec)[:8]) or "none"
      raise DataError(f"{key}={spec!r}: the directory holds no tokenizer (tokenizer.json or "
                      f"tokenizer.model); files there: {files}")
    return tokenizer
  if not paths.exists(spec):
    raise DataError(f"{key}={spec!r}: no such file or directory")
  blob = paths.read_bytes(spec)
  if blob.lstrip()[:1] == b"{":  # JSON: a tokenizer.json, whatever its name
    directory = spec.rstrip("/").rpartition("/")[0] or "."
    config_files = _read(directory, tuple(n for n in hf_tokenizer.FILES
                                          if n != hf_tokenizer.TOKENIZER_JSON))
    return HFTokenizer({hf_tokenizer.TOKENIZER_JSON: blob, **config_files}, spec)
  return _from_files({spm_tokenizer.MODEL_FILE: blob}, spec)


def save(tokenizer: Tokenizer, directory: str) -> None:
  """Writes the tokenizer's files into `directory` (a workdir, an export, a dataset)."""
  for name, blob in tokenizer.files.items():
    paths.write(paths.join(directory, name), blob)


def workdir_tokenizer(workdir: str) -> Tokenizer:
  """The tokenizer a training run in `workdir` used (and keeps there)."""
  tokenizer = load_dir(workdir)
  if tokenizer is None:
    raise errors.CheckpointError(f"{workdir} has no tokenizer (tokenizer.model or "
                                 "tokenizer.json): not a training run's workdir")
  return tokenizer


def check_vocab(tokenizer: Tokenizer, model_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when the model's embedding has fewer rows than the tokenizer has ids;
  logs how many rows no id reaches when it has more."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise errors.ConfigError(
      f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary of "
      f"{tokenizer.describe()}: set model.vocab_size to at least {tokenizer.vocab_size}")
  if tokenizer.vocab_size < model_cfg.vocab_size:
    logging.info("model.vocab_size=%d: %d embedding rows beyond the tokenizer's %d ids are never "
                 "used (a size rounded up for speed is fine)", model_cfg.vocab_size,
                 model_cfg.vocab_size - tokenizer.vocab_size, tokenizer.vocab_size)


def _given(data_cfg: ml_collections.ConfigDict, vocab_size: int, kept: Tokenizer | None
           ) -> Tokenizer:
  """data.tokenizer, loaded; a Hub that cannot be reached falls back on the workdir's copy."""
  try:
    return load(data_cfg.tokenizer, vocab_size=vocab_size)
  except errors.NetworkError as e:
    if kept is None or not hf_files.is_hub_name(data_cfg.tokenizer):
      raise
    logging.warning("data.tokenizer=%r cannot be checked against this workdir's copy (%s); "
                    "resuming with the copy", data_cfg.tokenizer, str(e).split(". ")[0])
    return kept


def load_or_train_tokenizer(data_cfg: ml_collections.ConfigDict, vocab_size: int, workdir: str,
                            weights_dir: Callable[[], str] = str) -> Tokenizer:
  """The run's tokenizer, kept in `workdir`: data.tokenizer, the workdir's copy, the tokenizer
  in `weights_dir()` (the directory the run's first weights come from, '' for none), the
  pretokenized data's, or one trained on the corpus, in that order."""
  kept = load_dir(workdir)
  if data_cfg.tokenizer:
    given = _given(data_cfg, vocab_size, kept)
    if kept is None:
      save(given, workdir)
      logging.info("Copied %s to %s", given.describe(), workdir)
    elif kept.files != given.files:
      raise DataError(
        f"data.tokenizer={data_cfg.tokenizer!r} differs from the tokenizer this workdir was "
        f"started with ({kept.kind}, in {workdir}): use a new workdir, or set data.tokenizer "
        f"to {workdir!r} or empty")
    return load_dir(workdir)
  if kept is not None:
    logging.info("Reusing the workdir's %s", kept.describe())
    return kept
  for what, find in (("the weights the run starts from", weights_dir),
                     ("the training data", lambda: sources.pretokenized_dataset(data_cfg))):
    directory = find()
    found = load_dir(directory) if directory else None
    if found is not None:
      save(found, workdir)
      logging.info("Using %s, the tokenizer of %s", found.describe(), what)
      return load_dir(workdir)
  start = time.perf_counter()
  docs = sources.first_documents(data_cfg, data_cfg.tokenizer_train_docs)
  tokenizer = spm_tokenizer.train_tokenizer(records.texts(docs), vocab_size,
                                            paths.join(workdir, spm_tokenizer.MODEL_FILE))
  logging.info("Trained a %d-piece BPE tokenizer on %d documents in %.1f s -> %s",
               tokenizer.vocab_size, len(docs), time.perf_counter() - start, workdir)
  return tokenizer


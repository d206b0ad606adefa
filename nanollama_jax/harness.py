"""lm-evaluation-harness on our checkpoints: the JAX model answers the harness's requests itself.

`NanoLlamaLM` (registered with the harness as `nanollama_jax`) reads a training run's workdir
and serves the three request types; `evaluate` runs harness tasks on it. Needs the `eval` extra
(pip install -e ".[eval]"); nothing else in the package imports this module.

How requests become tokens (the choices of lm-eval's `hf` backend on our Hugging Face export,
whose tokenizer puts BOS first, so that the two give the same log-likelihoods):
- loglikelihood: the context's trailing spaces move to the continuation; the context is
  [BOS] + encode(context), the continuation is what [BOS] + encode(context + continuation) holds
  after the context's tokens (the whole string is encoded, then split, so a word is not cut
  into other pieces at the boundary). An empty context is [BOS] alone. When context +
  continuation exceed max_seq_len + 1 tokens, the context is cut from the left.
- loglikelihood_rolling: the document is [BOS] + encode(text), as in training, scored in
  disjoint windows of up to max_seq_len predicted tokens, the last one with a full window of
  context (the harness's rolling windows). The `hf` backend's default encoding adds BOS to the
  text before its own prefix token, scoring BOS after BOS; `add_bos_token=False` there gives
  our numbers.
- generate_until: the prompt is [BOS] + encode(context), cut from the left to
  max_seq_len - max_gen_toks tokens; greedy (or sampled) KV-cache decoding runs until EOS or
  max_gen_toks, and the text is cut at the first stop sequence of `until`.

Batching: requests are sorted longest first and run batch_size rows at a time, each batch
padded to a power-of-two length (at least 16, at most max_seq_len) and, the last one, with
empty rows, so an evaluation compiles one program per length bucket rather than one per
request. The model runs on JAX's default device in one process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from nanollama_jax import errors

try:
  import lm_eval
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
except ImportError:
  errors.require(errors.MODULES["eval"], "eval", "downstream evaluation")
  raise  # lm-eval is installed but not the version pinned in the eval extra

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from nanollama_jax import checkpoint, generate, model
from nanollama_jax.data.tokenizer_source import workdir_tokenizer

SMALLEST_BUCKET = 16
# Generation settings the backend understands; others are ignored with a warning.
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}

log = logging.getLogger(__name__)

# (request key or None, context tokens, continuation tokens), as TemplateLM hands them over.
TokenRequest = tuple[Any, list[int], list[int]]


def bucket(length: int, cap: int) -> int:
  """The power of two >= `length` (at least SMALLEST_BUCKET) that rows are padded to, <= cap."""
  return min(cap, max(SMALLEST_BUCKET, 1 << (length - 1).bit_length()))


def _score_rows(graphdef, params: dict, inputs_BxT: jax.Array, targets_BxT: jax.Array,
                mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: the summed log-probability of the masked targets, and whether each is the argmax."""
  logits_BxTxV = model.apply(graphdef, params, inputs_BxT)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  target_logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return (jnp.sum(target_logp_BxT * mask_BxT, axis=1),
          jnp.all(greedy_BxT | (mask_BxT == 0), axis=1))


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
  for start in range(0, len(order), size):
    yield list(order[start:start + size])


def _progress(total: int, desc: str, disable: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=desc, file=sys.stderr,
                   disable=disable or not sys.stderr.isatty())


@register_model("nanollama_jax")
class NanoLlamaLM(TemplateLM):
  """A training run's checkpoint as an lm-eval model: `workdir` and optionally `step`."""

  def __init__(self, workdir: str, step: int | str | None = None, batch_size: int | str = 16,
               max_batch_size: int | None = None, device: str | None = None):
    super().__init__()
    if str(batch_size) == "auto" or max_batch_size is not None:
      raise errors.UsageError(
        "batch_size='auto' and max_batch_size are not supported: give a number "
        "of rows, e.g. batch_size=16")
    if device is not None:
      raise errors.UsageError(
        f"device={device!r}: the model runs on JAX's default device; choose it "
        "with JAX_PLATFORMS (e.g. JAX_PLATFORMS=cpu)")
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise errors.UsageError(f"batch_size={batch_size}: must be >= 1")
    self.workdir = workdir
    self.cfg, self.params, self.step = checkpoint.load_run(
      workdir, None if step is None else int(step))
    self.tok = workdir_tokenizer(workdir)
    self._score = jax.jit(functools.partial(_score_rows, model.graph(self.cfg.model)))

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    """The token an empty context stands for: BOS, which starts every training document."""
    return self.tok.bos_id

  @property
  def max_length(self) -> int:
    return self.cfg.model.max_seq_len

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    """[BOS] + the text's tokens, or the tokens alone with add_special_tokens=False."""
    del kwargs
    bos = [] if add_special_tokens is False else [self.tok.bos_id]
    return bos + self.tok.encode(string)

  def get_model_info(self) -> dict[str, Any]:
    """What the harness records about the model in its results."""
    return {"workdir": os.path.abspath(self.workdir), "step": self.step,
            "params": model.param_count(self.params), "max_length": self.max_length}

  def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) per request."""
    del kwargs
    L = self.max_length
    rows = []
    for key, context, continuation in requests:
      if not continuation or len(continuation) > L:
        raise errors.DataError(f"a continuation of {len(continuation)} tokens: it must have 1 to "
                               f"max_seq_len={L} tokens (request {key!r})")
      tokens = (context + continuation)[-(L + 1):]
      rows.append((tokens, len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    bar = _progress(len(rows), "loglikelihood", disable_tqdm)
    for batch in _batches(order, self.batch_size):
      T = bucket(len(rows[batch[0]][0]) - 1, L)
      inputs = np.full((self.batch_size, T), self.tok.pad_id, np.int32)
      targets = np.zeros((self.batch_size, T), np.int32)
      mask = np.zeros((self.batch_size, T), np.float32)
      for r, i in enumerate(batch):
        tokens, n_cont = rows[i]
        n = len(tokens) - 1
        inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
        mask[r, n - n_cont:n] = 1.0
      logp_B, greedy_B = jax.device_get(self._score(self.params, inputs, targets, mask))
      for r, i in enumerate(batch):
        results[i] = (float(logp_B[r]), bool(greedy_B[r]))
        if requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
      bar.update(len(batch))
    bar.close()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-probability of each whole document ([BOS] + text), window by window."""
    windows, owners = [], []
    for n, (text,) in enumerate(req.args for req in requests):
      for context, predicted in map(lm_utils.make_disjoint_window,
                                    lm_utils.get_rolling_token_windows(
                                      self.tok.encode(text), self.prefix_token_id,
                                      self.max_length, context_len=1)):
        windows.append((None, context, predicted))
        owners.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context's continuation up to its first stop sequence."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out = [""] * len(requests)
    bar = _progress(len(requests), "generate_until", disable_tqdm)
    for members in groups.values():
      contexts = [requests[i].args[0] for i in members]
      for i, text in zip(members, self._generate(contexts, requests[members[0]].args[1], bar)):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    bar.close()
    return out

  def _generate(self, contexts: Sequence[str], gen_kwargs: dict[str, Any], bar: tqdm.tqdm
                ) -> list[str]:
    """The continuations of `contexts` under one set of generation settings."""
    settings = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
    ignored = sorted(set(settings) - _GEN_KEYS)
    if ignored:
      log.warning("generation settings %s are not supported and are ignored", ignored)
    max_new = int(settings["max_gen_toks"])
    room = self.max_length - max_new
    if room < 1:
      raise errors.DataError(f"max_gen_toks={max_new} leaves no room for a prompt in the model's "
                             f"max_seq_len={self.max_length}")
    sampling = {"temperature": float(settings.get("temperature") or 0.0),
                "top_k": int(settings.get("top_k") or 0),
                "top_p": float(settings.get("top_p") or 1.0)} if settings.get("do_sample") else {}
    prompts = [self.tok_encode(c)[-room:] for c in contexts]
    out = [""] * len(contexts)
    for batch in _batches(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])),
                          self.batch_size):
      rows = [prompts[i] for i in batch] + [[self.tok.bos_id]] * (self.batch_size - len(batch))
      new = generate.generate(self.cfg.model, self.params, rows, max_new, **sampling,
                              eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                              pad_to=bucket(len(rows[0]), room))
      for i, ids in zip(batch, new):
        out[i] = postprocess_generated_text(self.tok.decode(ids), settings["until"], None)
      bar.update(len(batch))
    return out


def task_manager(tasks: Sequence[str], include_path: str | None) -> lm_eval.tasks.TaskManager:
  """The harness's task index: `include_path` alone when it defines every task asked for (the
  harness's own index of thousands of YAML files takes seconds to build), else both."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  if include_path:
    if not os.path.isdir(include_path):
      raise errors.UsageError(f"--include-path {include_path}: no such directory")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
      return local
  return TaskManager(include_path=include_path)


def evaluate(workdir: str, tasks: Sequence[str], limit: int | float | None = None,
             include_path: str | None = None, step: int | None = None, batch_size: int = 16,
             log_samples: bool = False) -> dict[str, Any]:
  """Runs harness tasks on a run's checkpoint; returns the harness's results dictionary."""
  manager = task_manager(tasks, include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise errors.UsageError(f"unknown task(s) {', '.join(unknown)}: name tasks of lm-eval "
                            "(lm_eval ls tasks) or define them in YAML under --include-path")
  lm = NanoLlamaLM(workdir, step, batch_size)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                 log_samples=log_samples)


def metrics_by_task(results: dict[str, Any]) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} from the harness's results, filter names dropped ("acc,none" ->
  "acc", "acc_stderr,none" -> "acc_stderr")."""
  table = {}
  for task, values in results["results"].items():
    table[task] = {key.split(",")[0]: value for key, value in values.items()
                   if "," in key and isinstance(value, (int, float))}
  return table


def results_json(results: dict[str, Any]) -> str:
  """The harness's results as JSON, without the per-sample log."""
  kept = {k: v for k, v in results.items() if k != "samples"}
  return json.dumps(kept, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)

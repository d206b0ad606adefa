"""Benchmarks measured as ratios within one run: `python scripts/benchmark.py [--json]`.

Sections (choose with --sections, all by default):
  compile_depth  compile time of the train step against depth (4, 8, 16, 32 layers), with the
                 layer scan and, for contrast, unrolled (--unrolled-max sets the deepest one)
  remat_memory   XLA's per-device memory estimate of the train step for each remat policy
  recipes        per-device memory estimates of the published recipes' train steps, compiled
                 ahead of time on abstract inputs for 1 device and for an 8-way FSDP mesh
  data           tokens/s of the input pipeline (tokenising on the fly, and from a pretokenized
                 dataset), first-fit padding, and their ratio to what the train step of
                 configs/tinystories_cpu.py consumes on this machine (--data-dir: JSONL with
                 {"text": ...}, repeated to --data-tokens tokens)
  tracking       what logging costs the CPU recipe's train step with Weights & Biases on
                 (offline) beside metrics.jsonl and TensorBoard, and without it: the time a
                 log call blocks the loop, and steps logged every step, interleaved rounds
  torch_compare  tokens/s and MFU of our float32 train step on one CPU device against the same
                 model and step in PyTorch (transformers LlamaForCausalLM, torch.optim.AdamW),
                 for multi-head and grouped-query attention; needs torch and transformers.
                 Alone, it runs on the real host (--host-devices defaults to 1), so that no
                 faked device can take a share of the CPU's threads; faking 8 devices measured
                 the same single-device step speed within noise (docs/performance.md)
  decode         tokens/s of our KV-cache decoding (generate.py) against transformers'
                 `generate` on our export: greedy, 200 new tokens after 20-token prompts, the
                 configs/tinystories_cpu.py model in float32, batch 1 and batch 8, interleaved
                 rounds; needs torch and transformers (alone, on the real host like torch_compare)

Memory numbers come from XLA's compiled memory analysis on the platform the script runs on
(on a CPU, an estimate for the CPU compiler's buffers, not a GPU's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import statistics
import sys
import time
from collections.abc import Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("compile_depth", "remat_memory", "recipes", "data", "tracking", "torch_compare",
            "decode")
_REAL_HOST = {"torch_compare", "decode"}  # sections that run on the real host alone
RECIPES = ("tinystories", "dense_180m", "tinyllama_1b", "llama3_2_1b")


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--host-devices", type=int, default=None,
                 help="CPU devices to fake for the 8-way mesh (CPU only; default 8, or 1 when "
                      "torch_compare is the only section)")
  p.add_argument("--unrolled-max", type=int, default=16,
                 help="deepest unrolled (no scan) model to compile for contrast; 0 skips")
  p.add_argument("--data-dir", default=None,
                 help="data section: a directory of .jsonl files with a 'text' field (default: "
                      "the TinyStories sample the package ships)")
  p.add_argument("--data-tokens", type=int, default=5_000_000,
                 help="data section: repeat the documents up to about this many tokens")
  p.add_argument("--system-malloc", action="store_true",
                 help="leave glibc's malloc as it is (train.keep_host_memory=False); by default "
                      "it keeps freed memory, as training does (nanollama_jax/hostmem.py)")
  p.add_argument("--torch-steps", type=int, default=5,
                 help="timed steps per round in torch_compare (the median step of each round)")
  p.add_argument("--decode-rounds", type=int, default=3,
                 help="interleaved rounds per engine and batch size in decode (the median round)")
  p.add_argument("--torch-rounds", type=int, default=5,
                 help="interleaved rounds per side in torch_compare; the result is the median "
                      "round, and the JSON keeps every round's tokens/s to show the spread")
  args = p.parse_args()
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
  if min(args.torch_steps, args.torch_rounds, args.decode_rounds) < 1:
    p.error("--torch-steps, --torch-rounds and --decode-rounds must be at least 1")
  if args.host_devices is None:
    args.host_devices = 1 if set(args.sections.split(",")) <= _REAL_HOST else 8
  return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Fake CPU devices for the sharded compile; harmless on GPU/TPU hosts (CPU platform only).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.host_devices}")
from nanollama_jax import hostmem  # pylint: disable=wrong-import-position
if ARGS is not None and not ARGS.system_malloc and ARGS.sections != "decode":
  # As train.py does by default, before JAX starts; not for decode alone, which measures what
  # scripts/generate.py runs (glibc's malloc as it is: its arenas serve XLA's threads there).
  hostmem.keep_freed_memory()

import jax  # pylint: disable=wrong-import-position

from nanollama_jax import config as config_lib  # pylint: disable=wrong-import-position
from nanollama_jax import errors, model, sharding  # pylint: disable=wrong-import-position
from nanollama_jax import loss as loss_lib  # pylint: disable=wrong-import-position
from nanollama_jax import step as step_lib  # pylint: disable=wrong-import-position
from nanollama_jax.data import pipeline  # pylint: disable=wrong-import-position
from nanollama_jax.data import sample_dir  # pylint: disable=wrong-import-position


def _cpu_model() -> str:
  """The host CPU's model name (Linux /proc/cpuinfo, else `platform`): timings depend on it."""
  import platform  # pylint: disable=import-outside-toplevel
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _progress(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _one_device_mesh() -> jax.sharding.Mesh:
  import ml_collections  # pylint: disable=import-outside-toplevel
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])


def _peak(memory) -> int:
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _bench_cfg(**model_overrides):
  cfg = config_lib.get_default_config()
  cfg.model.update(dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                        ffn_dim=704, max_seq_len=256))
  cfg.model.update(model_overrides)
  cfg.data.update(dict(seq_len=256, batch_size=8))
  return cfg


def compile_depth(unrolled_max: int) -> dict:
  mesh = _one_device_mesh()
  out: dict = {"shape": "dim 256, 8/4 heads, FFN 704, vocab 4096, batch 8 x 256, float32",
               "scan": {}, "unrolled": {}}
  for scan in (True, False):
    for depth in (4, 8, 16, 32):
      if not scan and depth > unrolled_max:
        continue
      cfg = _bench_cfg(n_layers=depth, scan_layers=scan)
      start = time.perf_counter()
      step_lib.lower_train_step(cfg, mesh).compile()
      seconds = time.perf_counter() - start
      out["scan" if scan else "unrolled"][str(depth)] = round(seconds, 3)
      _progress(f"compile {'scan' if scan else 'unrolled'} {depth} layers: {seconds:.2f}s")
  for kind in ("scan", "unrolled"):
    times = out[kind]
    if "4" in times:
      out[f"{kind}_ratio_to_4_layers"] = {d: round(t / times["4"], 3) for d, t in times.items()}
  return out


def remat_memory() -> dict:
  mesh = _one_device_mesh()
  out: dict = {"shape": "8 layers, dim 256, 8/4 heads, FFN 704, vocab 4096, batch 8 x 256, "
                        "float32, one device", "peak_mib": {}, "temp_mib": {}}
  for remat in config_lib.REMAT_POLICIES:
    memory = step_lib.lower_train_step(_bench_cfg(n_layers=8, remat=remat),
                                    mesh).compile().memory_analysis()
    out["peak_mib"][remat] = round(_peak(memory) / 2**20, 1)
    out["temp_mib"][remat] = round(memory.temp_size_in_bytes / 2**20, 1)
    _progress(f"remat {remat}: peak {out['peak_mib'][remat]} MiB")
  base = out["peak_mib"]["none"]
  out["peak_ratio_to_none"] = {k: round(v / base, 3) for k, v in out["peak_mib"].items()}
  return out


def recipes() -> dict:
  import ml_collections  # pylint: disable=import-outside-toplevel
  out: dict = {}
  n = len(jax.devices())
  for name in RECIPES:
    cfg = runpy.run_path(os.path.join(_ROOT, "configs", f"{name}.py"))["get_config"]()
    row = {"parameters": model.param_count_formula(cfg.model),
           "chunked_loss": loss_lib.chunked_loss(cfg.model)}
    # A recipe with the chunked loss is compiled a second time with the plain one, to show
    # what the chunks save.
    variants = {"": cfg}
    if row["chunked_loss"]:
      plain = cfg.copy_and_resolve_references()
      plain.model.chunked_loss = "off"
      variants["plain_loss_"] = plain
    meshes = {"1_device": _one_device_mesh()}
    if n >= 8:
      meshes["fsdp_8"] = sharding.make_mesh(ml_collections.ConfigDict(
        dict(data=1, fsdp=8, tensor=1)), jax.devices()[:8])
    for label, mesh in meshes.items():
      row[label] = {}
      for prefix, variant in variants.items():
        start = time.perf_counter()
        memory = step_lib.lower_train_step(variant, mesh).compile().memory_analysis()
        row[label].update({f"{prefix}peak_gib": round(_peak(memory) / 2**30, 2),
                           f"{prefix}temp_gib": round(memory.temp_size_in_bytes / 2**30, 2),
                           f"{prefix}compile_s": round(time.perf_counter() - start, 2)})
      row[label]["arguments_gib"] = round(memory.argument_size_in_bytes / 2**30, 2)
      _progress(f"{name} on {label}: peak {row[label]['peak_gib']} GiB per device"
                + (f" ({row[label]['plain_loss_peak_gib']} with the plain loss)"
                   if "plain_loss_peak_gib" in row[label] else ""))
    out[name] = row
  return out


TORCH_SHAPE = dict(vocab_size=4096, dim=288, n_layers=6, n_heads=6, ffn_dim=768,
                   max_seq_len=256)
TORCH_BATCH, TORCH_SEQ = 8, 256  # as _bench_cfg


def _median_step_seconds(step: Callable[[], float], warmup: int, steps: int) -> float:
  """Median wall time of `steps` calls of `step()` after `warmup` calls; each call blocks."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_batch(vocab_size: int, batch: int, seq_len: int, rng) -> dict:
  """A batch of random tokens, one document per row."""
  return pipeline.single_document_rows(rng.integers(0, vocab_size, (batch, seq_len + 1)))


def _jax_step_fn(cfg, batch_np: dict):
  """Our train step as train.py builds it, on a one-device mesh; returns a blocking closure."""
  mesh = _one_device_mesh()
  built = step_lib.build(cfg, mesh)
  step = built.train_step
  params = model.init_params(cfg.model, cfg.train.seed)
  state = built.fresh_state(cfg, params)
  batch = sharding.global_batch(batch_np, sharding.batch_sharding(mesh))
  holder = [state]

  def run() -> float:
    holder[0], step_metrics = step(holder[0], batch)
    return float(step_metrics["loss"])

  return run, jax.device_get(params)


def _pipeline_rate(data_cfg, tok, batches: int) -> float:
  """Tokens/s of `batches` training batches, after 5 of warm-up (workers starting)."""
  from nanollama_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  it = pipeline.train_batches(data_cfg, tok)
  try:
    for _ in range(5):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return batches * data_cfg.batch_size * data_cfg.seq_len / seconds, it.padding_fraction


def _corpus(texts: list[str], tok, target_tokens: int, tmp: str) -> tuple[str, int, int]:
  """The sample repeated to about `target_tokens` tokens in TMP/corpus.jsonl: (path, repeats,
  tokens per repeat)."""
  tokens = sum(len(t) for t in tok.encode_batch(texts)) + 2 * len(texts)
  repeats = max(1, round(target_tokens / tokens))
  corpus = os.path.join(tmp, "corpus.jsonl")
  with open(corpus, "w", encoding="utf-8") as f:
    for _ in range(repeats):
      for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
  return corpus, repeats, tokens


def _prepare_rate(texts: list[str], tok, repeats: int, tokens: int, out_dir: str) -> float:
  """Tokens/s of writing the repeated corpus as a pretokenized dataset, in this process."""
  from nanollama_jax.data import shards  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  writer = shards.ShardWriter(out_dir, tok)
  total = repeats * len(texts)
  for i in range(0, total, 1024):
    writer.add(tok.encode_batch([texts[j % len(texts)] for j in range(i, min(i + 1024, total))]))
  writer.close()
  return repeats * tokens / (time.perf_counter() - start)


def _pipeline_rates(data_cfg, tok, bpe, shards_dir: str) -> dict:
  """Tokens/s (and padding) of each way of feeding the recipe's batches."""
  rates: dict = {}
  for label, fields, n, encoder in [
    ("on_the_fly", dict(num_workers=0), 60, tok),
    ("on_the_fly_tokenizer_json", dict(num_workers=0), 60, bpe),
    ("on_the_fly_2_workers", dict(num_workers=2), 60, tok),
    ("on_the_fly_tokenizer_json_2_workers", dict(num_workers=2), 60, bpe),
    ("pretokenized", dict(train_files=shards_dir), 300, tok),
    ("pretokenized_first_fit", dict(train_files=shards_dir, packing="first_fit"), 300, tok),
  ]:
    c = data_cfg.copy_and_resolve_references()
    c.update(fields)
    rate, padding = _pipeline_rate(c, encoder, n)
    rates[label] = {"tokens_per_s": round(rate)}
    if c.packing == "first_fit":
      rates[label]["padding"] = round(padding, 4)
    _progress(f"data: {label}: {rate:,.0f} tokens/s")
  return rates


def data(data_dir: str, target_tokens: int) -> dict:
  import glob  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nanollama_jax.data import hf_tokenizer, records, spm_tokenizer  # pylint: disable=import-outside-toplevel

  cfg = runpy.run_path(os.path.join(_ROOT, "configs", "tinystories_cpu.py"))["get_config"]()
  files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
  if not files:
    raise SystemExit(f"--data-dir {data_dir}: no .jsonl files")
  texts = list(records.read_files(files, "text"))
  out: dict = {"recipe": "tinystories_cpu", "seq_len": cfg.data.seq_len,
               "batch_size": cfg.data.batch_size, "cores": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    tok = spm_tokenizer.train_tokenizer(texts, cfg.model.vocab_size,
                                        os.path.join(tmp, "tok.model"))
    # A tokenizer.json of Llama 3's kind (byte-level BPE, its pre-tokenizer), of the same size.
    bpe = hf_tokenizer.train_byte_level_bpe(texts, cfg.model.vocab_size, os.path.join(tmp, "bpe"))
    corpus, repeats, tokens = _corpus(texts, tok, target_tokens, tmp)
    out["corpus"] = {"documents": repeats * len(texts), "tokens": repeats * tokens}
    _progress(f"data: corpus of {repeats * tokens:,} tokens ({repeats} x {len(files)} files)")
    shards_dir = os.path.join(tmp, "tokens")
    out["prepare_tokens_per_s"] = round(_prepare_rate(texts, tok, repeats, tokens, shards_dir))
    data_cfg = cfg.data
    data_cfg.update(source="files", train_files=corpus)
    rates = out["pipeline"] = _pipeline_rates(data_cfg, tok, bpe, shards_dir)
    padding = {}
    for bins in (8, 64, 256):
      c = data_cfg.copy_and_resolve_references()
      c.update(train_files=shards_dir, packing="first_fit", pack_bins=bins)
      padding[str(bins)] = round(_pipeline_rate(c, tok, 100)[1], 4)
    out["first_fit_padding_by_bins"] = padding

  # What the CPU recipe's train step consumes on this machine: median of 5 steps.
  B, T = cfg.data.batch_size, cfg.data.seq_len
  run, _ = _jax_step_fn(cfg, _random_batch(cfg.model.vocab_size, B, T, np.random.default_rng(0)))
  seconds = _median_step_seconds(run, warmup=2, steps=5)
  consumed = B * T / seconds
  out["train_step_tokens_per_s"] = round(consumed)
  out["ratio_to_train_step"] = {k: round(v["tokens_per_s"] / consumed, 1) for k, v in rates.items()}
  _progress(f"data: the train step consumes {consumed:,.0f} tokens/s")
  return out


def _log_rows(trackers, first_step: int, rows: int) -> float:
  """Seconds one `trackers.log` of a training row blocks the caller (median of `rows`)."""
  times = []
  for step in range(first_step, first_step + rows):
    row = {"loss": 3.0 + 1 / step, "perplexity": 20.0, "lr": 1e-3, "grad_norm": 0.5,
           "tokens_seen": step * 4096, "skipped_steps": 0, "epoch": 0, "step_time_s": 0.9,
           "tokens_per_s": 4500.0, "mfu": 0.5}
    start = time.perf_counter()
    trackers.log(step, row)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def tracking(rounds: int = 3, steps: int = 30, warmup: int = 5) -> dict:
  """The CPU recipe's train step, logging every step to metrics.jsonl and TensorBoard, with and
  without Weights & Biases (offline: its thread and service run as online, without the upload):
  `steps` timed steps after `warmup` steps in which W&B starts, in interleaved rounds."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nanollama_jax import tracking as tracking_lib  # pylint: disable=import-outside-toplevel

  cfg = runpy.run_path(os.path.join(_ROOT, "configs", "tinystories_cpu.py"))["get_config"]()
  B, T = cfg.data.batch_size, cfg.data.seq_len
  run, _ = _jax_step_fn(cfg, _random_batch(cfg.model.vocab_size, B, T, np.random.default_rng(0)))
  _median_step_seconds(run, warmup=2, steps=1)
  out: dict = {"recipe": "tinystories_cpu", "steps_per_round": steps, "rounds": rounds,
               "recipe_log_every": cfg.train.log_every,
               "log_call_us": {}, "step_s": {"without_wandb": [], "with_wandb": []}}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for label, project in (("without_wandb", ""), ("with_wandb", "nanollama-benchmark")):
        cfg.wandb.update(project=project, mode="offline")
        workdir = os.path.join(tmp, f"{label}-{r}")
        trackers = tracking_lib.open_trackers(cfg, workdir, 0)
        for step in range(1, warmup + 1):
          run()
          _log_rows(trackers, step, 1)
        start = time.perf_counter()
        for step in range(warmup + 1, warmup + steps + 1):
          run()
          _log_rows(trackers, step, 1)
        out["step_s"][label].append((time.perf_counter() - start) / steps)
        out["log_call_us"].setdefault(label, []).append(
          round(_log_rows(trackers, warmup + steps + 1, 200) * 1e6, 1))
        trackers.close()
  medians = {k: statistics.median(v) for k, v in out["step_s"].items()}
  out["step_s_median"] = {k: round(v, 4) for k, v in medians.items()}
  out["overhead_of_wandb"] = round(medians["with_wandb"] / medians["without_wandb"] - 1, 4)
  blocked = (statistics.median(out["log_call_us"]["with_wandb"])
             - statistics.median(out["log_call_us"]["without_wandb"])) * 1e-6
  out["log_call_share_of_a_step"] = round(blocked / medians["without_wandb"], 6)
  _progress(f"tracking: W&B costs {out['overhead_of_wandb']:+.2%} of a step logged every step; "
            f"a log call blocks {blocked * 1e6:.0f} us more")
  return out


def _torch_step_fn(cfg, params: dict, batch_np: dict, threads: int):
  """The same model (our initial weights), loss and optimizer step in PyTorch."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from nanollama_jax import export  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  hf_cfg = export.hf_config(cfg.model, None, "float32")
  net = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float()
  tensors = {k: torch.from_numpy(v.copy())
             for k, v in export.to_hf_tensors(params, cfg.model).items()}
  missing, unexpected = net.load_state_dict(tensors, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:  # tied: lm_head is the embedding
    raise RuntimeError(f"weights do not match LlamaForCausalLM: missing {missing}, "
                       f"unexpected {unexpected}")
  net.train()
  optim_cfg = cfg.optim
  # As optim.decay_mask: weight decay on everything but the norms' scales.
  decay = [p for n, p in net.named_parameters() if "norm" not in n]
  no_decay = [p for n, p in net.named_parameters() if "norm" in n]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim_cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=optim_cfg.lr,
                          betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
  inputs = torch.from_numpy(np.asarray(batch_np["inputs"], np.int64))
  targets = torch.from_numpy(np.asarray(batch_np["targets"], np.int64))

  def run() -> float:
    opt.zero_grad(set_to_none=True)
    logits = net(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), optim_cfg.grad_clip)
    opt.step()
    return loss.item()

  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "torch_attention": net.config._attn_implementation}  # pylint: disable=protected-access
  return run, versions


def _cpu_comparison_skipped() -> str | None:
  """Why a comparison with PyTorch on this host's CPU cannot run, or None."""
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    return f"needs {' and '.join(missing)} (the test extra)"
  if jax.default_backend() != "cpu":
    return f"a CPU comparison; this run is on {jax.default_backend()}"
  return None


def _cpu_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def torch_compare(steps: int, rounds: int) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nanollama_jax import metrics  # pylint: disable=import-outside-toplevel
  skipped = _cpu_comparison_skipped()
  if skipped:
    return {"skipped": skipped}
  threads = _cpu_threads()
  # Best of 50 runs (the default): the fastest the CPU goes; a busy neighbour only slows it.
  peak = metrics.measure_matmul_peak()
  out: dict = {"shape": "dim 288, 6 layers, 6 heads, FFN 768, vocab 4096, batch 8 x 256, "
                        "float32, one CPU device",
               "cpu_threads": threads, "host_devices": len(jax.devices()),
               "keep_host_memory": hostmem.applied(),
               "matmul_peak_gflops": round(peak / 1e9, 1), "steps": steps, "rounds": rounds,
               "variants": {}}
  tokens = TORCH_BATCH * TORCH_SEQ
  rng = np.random.default_rng(0)
  for label, kv_heads in (("mha", 6), ("gqa", 2)):
    # Ours as a 6-layer recipe runs (layers unrolled, like configs/tinystories_cpu.py), and with
    # the layer scan, the default that keeps compile time flat for deep models.
    cfg = _bench_cfg(**TORCH_SHAPE, n_kv_heads=kv_heads, scan_layers=False)
    batch_np = _random_batch(cfg.model.vocab_size, TORCH_BATCH, TORCH_SEQ, rng)
    jax_run, params = _jax_step_fn(cfg, batch_np)
    scan_run, _ = _jax_step_fn(_bench_cfg(**TORCH_SHAPE, n_kv_heads=kv_heads), batch_np)
    torch_run, versions = _torch_step_fn(cfg, params, batch_np, threads)
    out.update(versions)
    # The same weights and batch: the first step's losses agree to float32 rounding.
    first_losses = (jax_run(), scan_run(), torch_run())
    flops = metrics.model_flops_per_token(cfg.model, TORCH_SEQ)
    # Interleaved rounds, so a neighbour's load slows every side alike; the median round leaves
    # out the rounds a busy neighbour slowed (on a shared 2-core VM one side's rate moved by up
    # to 20% between whole runs with 3 rounds).
    times: dict = {"ours": [], "ours_scan": [], "torch": []}
    for _ in range(rounds):
      for name, run in (("ours", jax_run), ("ours_scan", scan_run), ("torch", torch_run)):
        times[name].append(_median_step_seconds(run, 2, steps))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    row: dict = {}
    for name in ("ours", "ours_scan", "torch"):
      row[f"{name}_tokens_per_s"] = round(tokens / seconds[name])
      row[f"{name}_mfu"] = round(flops * tokens / seconds[name] / peak, 3)
      row[f"{name}_rounds_tokens_per_s"] = [round(tokens / t) for t in times[name]]
    row["ratio_ours_to_torch"] = round(seconds["torch"] / seconds["ours"], 3)
    row["ratio_ours_scan_to_torch"] = round(seconds["torch"] / seconds["ours_scan"], 3)
    row["flops_per_token"] = flops
    row["first_loss_ours_scan_torch"] = [round(x, 5) for x in first_losses]
    out["variants"][label] = row
    _progress(f"{label}: ours {row['ours_tokens_per_s']} tok/s (scan {row['ours_scan_tokens_per_s']}),"
              f" torch {row['torch_tokens_per_s']} tok/s, x{row['ratio_ours_to_torch']} (scan "
              f"x{row['ratio_ours_scan_to_torch']}), MFU {row['ours_mfu']:.1%} vs "
              f"{row['torch_mfu']:.1%}")
  return out


DECODE_NEW, DECODE_PROMPT, DECODE_BATCHES = 200, 20, (1, 8)


def decode(rounds: int) -> dict:
  """Our KV-cache decoding against transformers' generate on the same weights."""
  import tempfile  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel
  from nanollama_jax import export, generate  # pylint: disable=import-outside-toplevel
  skipped = _cpu_comparison_skipped()
  if skipped:
    return {"skipped": skipped}
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  threads = _cpu_threads()
  torch.set_num_threads(threads)
  cfg = runpy.run_path(os.path.join(_ROOT, "configs", "tinystories_cpu.py"))["get_config"]()
  params = jax.device_get(model.init_params(cfg.model, 0))
  with tempfile.TemporaryDirectory() as tmp:
    export.save_hf(tmp, params, cfg.model)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
  out: dict = {"model": f"configs/tinystories_cpu.py: dim {cfg.model.dim}, {cfg.model.n_layers} "
                        f"layers, {cfg.model.n_heads}/{cfg.model.n_kv_heads} heads, vocab "
                        f"{cfg.model.vocab_size}, {cfg.model.dtype}",
               "new_tokens": DECODE_NEW, "prompt_tokens": DECODE_PROMPT, "rounds": rounds,
               "cpu_threads": threads, "torch": torch.__version__,
               "transformers": transformers.__version__, "keep_host_memory": hostmem.applied(),
               "batches": {}}
  rng = np.random.default_rng(0)
  for batch in DECODE_BATCHES:
    prompts = rng.integers(4, cfg.model.vocab_size, (batch, DECODE_PROMPT))

    def ours(prompts=prompts):
      return generate.generate(cfg.model, params, prompts.tolist(), DECODE_NEW, eos_id=None)

    def theirs(prompts=prompts):
      with torch.no_grad():
        ids = hf.generate(torch.tensor(prompts), max_new_tokens=DECODE_NEW,
                          min_new_tokens=DECODE_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
      return ids[:, DECODE_PROMPT:].tolist()

    # The first call compiles (ours) or warms up (theirs); the same greedy tokens show that
    # both decode the same model (random weights may hold a near-tie that float32 breaks
    # differently far into a row, so the share of equal tokens is kept, not asserted).
    same = np.mean(np.array(ours()) == np.array(theirs()))
    times: dict = {"ours": [], "transformers": []}
    for _ in range(rounds):
      for name, run in (("ours", ours), ("transformers", theirs)):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    rates = {name: round(batch * DECODE_NEW / statistics.median(t)) for name, t in times.items()}
    out["batches"][str(batch)] = {
      "ours_tokens_per_s": rates["ours"], "transformers_tokens_per_s": rates["transformers"],
      "ratio_ours_to_transformers": round(rates["ours"] / rates["transformers"], 2),
      "rounds_tokens_per_s": {name: [round(batch * DECODE_NEW / x) for x in t]
                              for name, t in times.items()},
      "same_greedy_tokens": round(float(same), 4)}
    _progress(f"decode batch {batch}: ours {rates['ours']} tok/s, transformers "
              f"{rates['transformers']} tok/s")
  return out


def _print_decode(r: dict) -> None:
  if "skipped" in r:
    print(f"\ndecode skipped: {r['skipped']}")
    return
  print(f"\ndecoding {r['new_tokens']} new tokens greedily after {r['prompt_tokens']}-token "
        f"prompts, {r['model']}, against transformers {r['transformers']} (torch {r['torch']}, "
        f"{r['cpu_threads']} threads); median of {r['rounds']} interleaved rounds:")
  for batch, v in r["batches"].items():
    print(f"  batch {batch:>2}  ours {v['ours_tokens_per_s']:>6,} tokens/s  transformers "
          f"{v['transformers_tokens_per_s']:>6,} tokens/s  x{v['ratio_ours_to_transformers']}  "
          f"(same greedy tokens: {v['same_greedy_tokens']:.1%})")


def _print_compile_and_memory(results: dict) -> None:
  if "compile_depth" in results:
    r = results["compile_depth"]
    print(f"\ncompile time of the train step ({r['shape']}):")
    for kind in ("scan", "unrolled"):
      for depth, seconds in r[kind].items():
        ratio = r.get(f"{kind}_ratio_to_4_layers", {}).get(depth)
        print(f"  {kind:9s} {depth:>3s} layers  {seconds:7.2f} s  x{ratio}")
  if "remat_memory" in results:
    r = results["remat_memory"]
    print(f"\nper-device memory by remat policy ({r['shape']}):")
    for remat, mib in r["peak_mib"].items():
      print(f"  {remat:15s} peak {mib:8.1f} MiB (x{r['peak_ratio_to_none'][remat]})  "
            f"temporaries {r['temp_mib'][remat]:8.1f} MiB")
  if "recipes" in results:
    print("\nrecipes, per-device memory estimates (compiled ahead of time):")
    for name, row in results["recipes"].items():
      cells = [f"{label} peak {v['peak_gib']} GiB" + (
                 f" (plain loss {v['plain_loss_peak_gib']} GiB)" if "plain_loss_peak_gib" in v
                 else "") for label, v in row.items() if isinstance(v, dict)]
      print(f"  {name:14s} {row['parameters']:>14,} params  " + "; ".join(cells))


def _print_data(r: dict) -> None:
  print(f"\ninput pipeline, {r['recipe']} batches ({r['batch_size']} x {r['seq_len']}), "
        f"{r['corpus']['tokens']:,}-token corpus, {r['cores']} cores:")
  print(f"  writing the pretokenized dataset  {r['prepare_tokens_per_s']:>12,} tokens/s")
  for label, v in r["pipeline"].items():
    extra = f"  padding {v['padding']:.2%}" if "padding" in v else ""
    print(f"  {label:35s} {v['tokens_per_s']:>12,} tokens/s  "
          f"x{r['ratio_to_train_step'][label]} the train step{extra}")
  print(f"  the train step consumes          {r['train_step_tokens_per_s']:>12,} tokens/s")
  print("  first-fit padding by data.pack_bins: " + ", ".join(
    f"{b}: {p:.2%}" for b, p in r["first_fit_padding_by_bins"].items()))


def _print_torch_compare(r: dict) -> None:
  if "skipped" in r:
    print(f"\ntorch_compare skipped: {r['skipped']}")
    return
  print(f"\ntrain step against PyTorch {r['torch']} / transformers {r['transformers']} "
        f"(attention {r['torch_attention']}), {r['shape']}, {r['cpu_threads']} threads each, "
        f"{r['host_devices']} host device(s); MFU against a measured float32 matmul peak of "
        f"{r['matmul_peak_gflops']} GFLOP/s; median of {r['rounds']} interleaved rounds, "
        f"the rounds' range in brackets:")

  def spread(v: dict, name: str) -> str:
    rates = v[f"{name}_rounds_tokens_per_s"]
    return f"[{min(rates):,}-{max(rates):,}]"

  for label, v in r["variants"].items():
    print(f"  {label}  ours {v['ours_tokens_per_s']:>7,} tokens/s {spread(v, 'ours')} (MFU "
          f"{v['ours_mfu']:.1%})  torch {v['torch_tokens_per_s']:>7,} tokens/s "
          f"{spread(v, 'torch')} (MFU {v['torch_mfu']:.1%})  ours/torch "
          f"x{v['ratio_ours_to_torch']}")
    print(f"       with the layer scan {v['ours_scan_tokens_per_s']:>7,} tokens/s "
          f"{spread(v, 'ours_scan')} (MFU {v['ours_scan_mfu']:.1%}), "
          f"x{v['ratio_ours_scan_to_torch']}; first-step losses "
          f"(ours, scan, torch) {v['first_loss_ours_scan_torch']}")
  print(f"  glibc malloc keeps freed memory (train.keep_host_memory): {r['keep_host_memory']}")


def main() -> None:
  args = ARGS
  results: dict = {"platform": jax.devices()[0].platform, "device": jax.devices()[0].device_kind,
                   "cpu": _cpu_model(), "jax": jax.__version__}
  chosen = args.sections.split(",")
  if "compile_depth" in chosen:
    results["compile_depth"] = compile_depth(args.unrolled_max)
  if "remat_memory" in chosen:
    results["remat_memory"] = remat_memory()
  if "recipes" in chosen:
    results["recipes"] = recipes()
  if "data" in chosen:
    results["data"] = data(args.data_dir or str(sample_dir()), args.data_tokens)
  if "tracking" in chosen:
    results["tracking"] = tracking()
  if "torch_compare" in chosen:
    results["torch_compare"] = torch_compare(args.torch_steps, args.torch_rounds)
  if "decode" in chosen:
    results["decode"] = decode(args.decode_rounds)
  if args.json:
    print(json.dumps(results, indent=2))
    return
  print(f"platform: {results['platform']} ({results['device']}), CPU {results['cpu']}, "
        f"jax {results['jax']}")
  _print_compile_and_memory(results)
  if "data" in results:
    _print_data(results["data"])
  if "tracking" in results:
    r = results["tracking"]
    print(f"\nlogging every step of {r['recipe']}: {r['step_s_median']['without_wandb']:.3f} s a "
          f"step with metrics.jsonl and TensorBoard, {r['step_s_median']['with_wandb']:.3f} s "
          f"with W&B (offline) too: {r['overhead_of_wandb']:+.2%}; a log call blocks "
          f"{r['log_call_share_of_a_step']:.4%} of a step more (median of {r['rounds']} rounds)")
  if "torch_compare" in results:
    _print_torch_compare(results["torch_compare"])
  if "decode" in results:
    _print_decode(results["decode"])


if __name__ == "__main__":
  errors.cli(main)

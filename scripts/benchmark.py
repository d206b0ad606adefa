"""Benchmarks measured as ratios within one run: `python scripts/benchmark.py [--json]`.

Sections (choose with --sections, all by default):
  compile_depth  compile time of the train step against depth (4, 8, 16, 32 layers), with the
                 layer scan and, for contrast, unrolled (--unrolled-max sets the deepest one)
  remat_memory   XLA's per-device memory estimate of the train step for each remat policy
  recipes        per-device memory estimates of the published recipes' train steps, compiled
                 ahead of time on abstract inputs for 1 device and for an 8-way FSDP mesh

Memory numbers come from XLA's compiled memory analysis on the platform the script runs on
(on a CPU, an estimate for the CPU compiler's buffers, not a GPU's).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("compile_depth", "remat_memory", "recipes")
RECIPES = ("tinystories", "dense_180m", "tinyllama_1b", "llama3_2_1b")


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--host-devices", type=int, default=8,
                 help="CPU devices to fake for the 8-way mesh (CPU only; default 8)")
  p.add_argument("--unrolled-max", type=int, default=16,
                 help="deepest unrolled (no scan) model to compile for contrast; 0 skips")
  args = p.parse_args()
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
  return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Fake CPU devices for the sharded compile; harmless on GPU/TPU hosts (CPU platform only).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.host_devices}")

import jax  # pylint: disable=wrong-import-position

sys.path.insert(0, _ROOT)
from nanollama_jax import config as config_lib  # pylint: disable=wrong-import-position
from nanollama_jax import model, sharding, train  # pylint: disable=wrong-import-position


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
      train.lower_train_step(cfg, mesh).compile()
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
    memory = train.lower_train_step(_bench_cfg(n_layers=8, remat=remat),
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
    row = {"parameters": model.param_count_formula(cfg.model)}
    meshes = {"1_device": _one_device_mesh()}
    if n >= 8:
      meshes["fsdp_8"] = sharding.make_mesh(ml_collections.ConfigDict(
        dict(data=1, fsdp=8, tensor=1)), jax.devices()[:8])
    for label, mesh in meshes.items():
      start = time.perf_counter()
      memory = train.lower_train_step(cfg, mesh).compile().memory_analysis()
      row[label] = {"peak_gib": round(_peak(memory) / 2**30, 2),
                    "arguments_gib": round(memory.argument_size_in_bytes / 2**30, 2),
                    "temp_gib": round(memory.temp_size_in_bytes / 2**30, 2),
                    "compile_s": round(time.perf_counter() - start, 2)}
      _progress(f"{name} on {label}: peak {row[label]['peak_gib']} GiB per device")
    out[name] = row
  return out


def main() -> None:
  args = ARGS
  results: dict = {"platform": jax.devices()[0].platform, "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__}
  chosen = args.sections.split(",")
  if "compile_depth" in chosen:
    results["compile_depth"] = compile_depth(args.unrolled_max)
  if "remat_memory" in chosen:
    results["remat_memory"] = remat_memory()
  if "recipes" in chosen:
    results["recipes"] = recipes()
  if args.json:
    print(json.dumps(results, indent=2))
    return
  print(f"platform: {results['platform']} ({results['device']}), jax {results['jax']}")
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
      cells = [f"{label} peak {v['peak_gib']} GiB" for label, v in row.items()
               if isinstance(v, dict)]
      print(f"  {name:14s} {row['parameters']:>14,} params  " + "; ".join(cells))


if __name__ == "__main__":
  main()

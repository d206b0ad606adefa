"""Sampling with a KV cache: equal to recomputing the sequence, to transformers' greedy decoding,
and to the top-k / top-p sets."""

import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import LLAMA31, REPO, model_cfg, our_logits, random_params
from jax.sharding import PartitionSpec as P

from nanollama_jax import checkpoint, config, export, generate, model, sharding
from nanollama_jax.data.tokenizer_source import load as load_tokenizer

torch.set_num_threads(2)


@pytest.mark.slow
def test_kv_cache_decoding_equals_recomputing_the_sequence():
  cfg = model_cfg(n_kv_heads=2, rope_scaling=LLAMA31)
  params = random_params(cfg, seed=3)
  prompts = [[1, 17, 42, 5, 99], [1, 7], [1, 64, 3, 3, 12, 8, 101, 2, 40]]  # ragged: left padding
  new, logits = generate.generate(cfg, params, prompts, max_new_tokens=12, eos_id=None,
                                  return_logits=True)
  worst = 0.0
  for i, (prompt, row) in enumerate(zip(prompts, new)):
    assert len(row) == 12
    full = our_logits(cfg, params, np.array([prompt + row], np.int32))[0]
    # The logits that chose new token j are the full model's at position len(prompt) - 1 + j.
    expected = full[len(prompt) - 1:len(prompt) - 1 + 12]
    worst = max(worst, float(np.abs(logits[i] - expected).max()))
    assert row == [int(t) for t in expected.argmax(-1)]  # greedy: each token is the argmax
    alone = generate.generate(cfg, params, [prompt], max_new_tokens=12, eos_id=None)
    assert alone == [row]  # the same with and without batch padding
  print(f"max |cached - recomputed logit| {worst:.2e}")
  assert worst < 1e-5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_in_phases_of_a_growing_cache_equals_one_phase(monkeypatch, scan_layers):
  cfg = model_cfg(n_kv_heads=2, scan_layers=scan_layers)
  params = random_params(cfg, seed=6)
  prompts = [[1, 17, 42, 5], [1, 7], [1, 64, 3]]
  # By default a stacked cache (scanned layers) is not lengthened; tested here all the same.
  assert generate._phases(cfg, 4, 13) == (1 if scan_layers else 3)
  assert generate._phases(cfg, 100, 13) == 1
  free = generate.generate(cfg, params, prompts, max_new_tokens=13, eos_id=None)
  stop = free[1][5]  # row 1 stops in the second of three phases
  runs = {}
  for phases in (1, 3, 4, 13):
    monkeypatch.setattr(generate, "_phases", lambda cfg, prompt, new, phases=phases: phases)
    runs[phases] = generate.generate(cfg, params, prompts, max_new_tokens=13, eos_id=stop,
                                     return_logits=True)
  tokens, logits = runs[1]
  assert tokens[1] == free[1][:free[1].index(stop)] and len(tokens[1]) <= 5
  for phases in (3, 4, 13):
    assert runs[phases][0] == tokens
    np.testing.assert_allclose(runs[phases][1], logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_row_stops_at_the_first_of_several_stop_ids():
  cfg = model_cfg(n_kv_heads=2)
  params = random_params(cfg, seed=4)
  prompts = [[1, 17, 42], [1, 7]]
  free = generate.generate(cfg, params, prompts, max_new_tokens=16, eos_id=None)
  stops = (free[0][9], free[1][4])  # e.g. the chat format's end of turn and EOS
  cut = [row[:min(row.index(s) for s in stops if s in row)] for row in free]
  assert generate.generate(cfg, params, prompts, max_new_tokens=16, eos_id=stops) == cut
  assert max(map(len, cut)) <= 9
  assert generate.generate(cfg, params, prompts, max_new_tokens=16, eos_id=stops[0]) == [
    row[:row.index(stops[0])] if stops[0] in row else row for row in free]


def test_greedy_generation_matches_transformers(tmp_path):
  cfg = model_cfg(n_kv_heads=1)
  params = random_params(cfg, seed=5)
  params["lm_head_DxV"] = params["lm_head_DxV"] * 30  # peaked logits: no near-ties to break
  export.save_hf(str(tmp_path), params, cfg)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  prompt = [1, 30, 31, 32]
  ours = generate.generate(cfg, params, [prompt], max_new_tokens=20, eos_id=None)[0]
  with torch.no_grad():
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                         do_sample=False, eos_token_id=None, pad_token_id=3)
  assert theirs[0, len(prompt):].tolist() == ours
  assert len(set(ours)) > 2  # a real continuation, not one token repeated


def test_greedy_tokens_are_jnp_argmax_ties_and_nans_included():
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 4, (64, 4096)).astype(np.float32)  # many tied maxima per row
  logits[5, [7, 900]] = np.nan  # argmax gives the first NaN
  logits[6, :] = -np.inf
  logits[7, 4095] = np.inf
  greedy = np.asarray(jax.jit(generate.greedy_tokens)(jnp.asarray(logits)))
  np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))
  assert greedy.dtype == np.int32
  assert (greedy[5], greedy[6], greedy[7]) == (7, 0, 4095)


def test_sampling_respects_top_k_top_p_and_the_seed():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  top2 = np.asarray(generate.sample_logits(logits, keys, 1.0, 2, 1.0))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
  nucleus = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 0.7))  # 0.5 + 0.3 >= 0.7
  assert set(nucleus.tolist()) == {0, 1}
  everything = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 1.0))
  assert set(everything.tolist()) == {0, 1, 2, 3}
  again = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 1.0))
  np.testing.assert_array_equal(everything, again)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sampling_split_over_a_mesh_equals_one_device(scan_layers):
  """Rows over data x fsdp (3 prompts padded to 4 rows), K/V heads and the cache over tensor:
  the tokens and logits of one device, through the scan and the loop over layers alike."""
  cfg = model_cfg(n_kv_heads=2, scan_layers=scan_layers)
  params = random_params(cfg, seed=6)
  prompts = [[1, 17, 42, 5, 99], [1, 7], [1, 64, 3, 3, 12, 8]]
  alone, alone_logits = generate.generate(cfg, params, prompts, max_new_tokens=10, eos_id=None,
                                          return_logits=True)
  mesh_cfg = config.get_default_config().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  shardings = sharding.param_shardings(model.logical_axes(cfg), params, mesh)
  split = jax.device_put(params, shardings)
  assert split["layers"]["attn"]["wk_DxKxE"].sharding.spec == P(None, "fsdp", "tensor", None)
  new, logits = generate.generate(cfg, split, prompts, max_new_tokens=10, eos_id=None,
                                  return_logits=True)
  assert new == alone and len(new) == 3
  np.testing.assert_allclose(logits, alone_logits, atol=2e-5)
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: model.init_cache(cfg, jnp.ones((4, 16), bool)))()
  # One [L, B, K, S, E] array with a scan over the layers, L [B, K, S, E] arrays with a loop.
  k = cache["k"] if scan_layers else cache["k"][0]
  layers = (2,) if scan_layers else ()
  assert len(cache["k"]) == 2 and k.shape == (*layers, 4, 2, 16, cfg.dim // cfg.n_heads)
  # rows over data x fsdp, K/V heads over tensor
  assert k.sharding.spec == P(*(None,) * len(layers), ("data", "fsdp"), "tensor")


@pytest.mark.slow
def test_a_prompts_file_is_served_in_batches_in_order(trained_run, tmp_path, capsys):
  main = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"))["main"]
  texts = ["Once upon a time", "The cat sat", "Tom and Lily went to the park", "A big red ball",
           "She said"]
  prompts_file, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  main(["--workdir", str(trained_run), "--prompts-file", str(prompts_file), "--out", str(out),
        "--batch-size", "2", "--temperature", "0", "--max-new-tokens", "100000"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  cfg, params, step = checkpoint.load_run(str(trained_run))
  tok = load_tokenizer(str(trained_run / "tokenizer.model"))
  assert [r["prompt"] for r in rows] == texts  # in order; the last batch's filler row dropped
  encoded = [[tok.bos_id, *tok.encode(text)] for text in texts]
  # A batch's prompts are padded to a multiple of 8 tokens; the rest of the context is theirs.
  pads = [-(-max(map(len, encoded[i - i % 2:i - i % 2 + 2])) // 8) * 8 for i in range(5)]
  assert 16 in pads and 8 in pads
  for ids, pad, row in zip(encoded, pads, rows):
    room = cfg.model.max_seq_len - pad
    alone = generate.generate(cfg.model, params, [ids], room, pad_id=tok.pad_id,
                              eos_id=tok.eos_id)[0]
    assert row["completion"] == tok.continuation(ids[1:], alone)
    assert row["new_tokens"] == len(alone) and 0 < len(alone) <= room
    assert {k: row[k] for k in ("step", "max_new_tokens", "temperature", "seed")} == {
      "step": step, "max_new_tokens": 100000, "temperature": 0.0, "seed": 0}
  err = capsys.readouterr().err
  for pad in set(pads):
    assert (f"note: --max-new-tokens 100000 does not fit the model's context of "
            f"{cfg.model.max_seq_len} tokens after a prompt of {pad}: generating at most "
            f"{cfg.model.max_seq_len - pad}") in err
  assert not (tmp_path / "out.jsonl.partial").exists()

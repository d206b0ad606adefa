"""Sampling with a KV cache: equal to recomputing the sequence, to transformers' greedy decoding,
and to the top-k / top-p sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import LLAMA31, model_cfg, our_logits, random_params
from nanollama_jax import export, generate

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

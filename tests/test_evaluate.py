"""Perplexity: the token-weighted loss over every token of a split, by hand and from the script."""

import json

import numpy as np
import pytest

from helpers import our_logits, run_script
from nanollama_jax import checkpoint, errors, evaluate
from nanollama_jax.data.tokenizer_source import load as load_tokenizer


@pytest.mark.slow
def test_perplexity_is_exp_of_the_token_weighted_loss_by_hand(trained_run, tmp_path):
  cfg, params, step = checkpoint.load_run(str(trained_run))
  assert step == 40
  tok = load_tokenizer(str(trained_run / "tokenizer.model"))
  texts = ["Once upon a time, there was a cat.", "The dog ran to the park.", "Tom was happy."]
  path = tmp_path / "small.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  result = evaluate.perplexity(cfg, params, tok, str(path))

  # By hand: each document alone through the model, log-softmax, summed over its targets.
  total, count = 0.0, 0
  for text in texts:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    logits = our_logits(cfg.model, params, np.array([ids[:-1]], np.int32))[0].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total += float(sum(logz[t] - logits[t, ids[t + 1]] for t in range(len(ids) - 1)))
    count += len(ids) - 1
  assert result["tokens"] == count
  assert result["loss"] == pytest.approx(total / count, rel=1e-5)
  assert result["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)
  # At the model's whole context (rows of max_seq_len tokens, documents kept apart): the same.
  assert cfg.data.seq_len < cfg.model.max_seq_len
  full = evaluate.perplexity(cfg, params, tok, str(path), seq_len=cfg.model.max_seq_len)
  assert full["tokens"] == count and full["loss"] == pytest.approx(total / count, rel=1e-5)
  with pytest.raises(errors.UsageError, match=r"must be in \[2, 128\]"):
    evaluate.perplexity(cfg, params, tok, str(path), seq_len=cfg.model.max_seq_len + 1)

  cli = run_script("eval_perplexity.py", "--workdir", trained_run.name, "--files", str(path),
                   "--json", cwd=trained_run.parent)
  assert cli.returncode == 0, cli.stderr[-2000:]
  out = json.loads(cli.stdout)
  assert out["step"] == 40 and out["tokens"] == count
  assert out["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
  # Over the validation split the numbers are the run's final evaluation's, on more tokens.
  whole = run_script("eval_perplexity.py", "--workdir", trained_run.name, "--json",
                     "--step", "20", cwd=trained_run.parent)
  assert whole.returncode == 0 and json.loads(whole.stdout)["step"] == 20
  assert json.loads(whole.stdout)["tokens"] > 30000
  missing = run_script("eval_perplexity.py", "--workdir", trained_run.name, "--step", "7",
                       cwd=trained_run.parent)
  assert missing.returncode != 0 and "no checkpoint for step 7" in missing.stderr


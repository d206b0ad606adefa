"""The lm-eval backend against the harness's own Hugging Face backend on the same checkpoint."""

import json
import os
import re
import runpy
import shutil

import jax
import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from helpers import REPO
from nanollama_jax import checkpoint, errors, generate, harness, model
from nanollama_jax.data.tokenizer_source import load as load_tokenizer

torch.set_num_threads(2)
MC_TASK, GEN_TASK = "tinystories_next_sentence", "tinystories_continue"
MAX_GEN = 24


def sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if s]


def greedy_until_period(run, prompts: list[str]) -> list[str]:
  """Our model's greedy continuations of `prompts`, cut at the first '.', by hand."""
  cfg, params, _ = checkpoint.load_run(str(run))
  tok = load_tokenizer(str(run / "tokenizer.model"))
  ids = [([tok.bos_id] + tok.encode(p))[-(cfg.model.max_seq_len - MAX_GEN):] for p in prompts]
  new = generate.generate(cfg.model, params, ids, MAX_GEN, eos_id=tok.eos_id, pad_id=tok.pad_id)
  return [tok.decode(n).split(".")[0] for n in new]


def write_tasks(task_dir, sample_dir, run) -> dict:
  """Two harness tasks on the sample's validation stories, YAML + JSONL; returns their docs.

  tinystories_next_sentence (multiple choice): the sentences of a story up to sentence k, and
  three candidates for sentence k, the true one and sentence k of the next two stories; every
  fifth context is the whole story before its last sentence, longer than the model's window.
  tinystories_continue (generation, exact match): a story's first sentence and three words of
  the next; the target is the rest of that sentence for odd docs, our model's own greedy
  continuation for even ones, so exact match is at least 1/2. Prompt 6 runs to the last
  sentence, longer than the window, so it is cut on the left.
  """
  stories = [sentences(json.loads(line)["text"]) for line in open(sample_dir / "validation.jsonl")]
  stories = [s for s in stories if len(s) >= 8]
  mc = []
  for i in range(15):
    k = len(stories[i]) - 1 if i % 5 == 4 else 1 + i % 5
    label = i % 3
    others = [stories[i + 1][k % len(stories[i + 1])], stories[i + 2][k % len(stories[i + 2])]]
    choices = others[:label] + [stories[i][k]] + others[label:]
    mc.append({"context": " ".join(stories[i][:k]), "choices": choices, "label": label})
  gen = []
  for j, story in enumerate(stories[20:28]):
    k = len(story) - 1 if j == 6 else 1
    words = story[k].split()
    gen.append({"prompt": " ".join(story[:k] + words[:3]),
                "target": " " + " ".join(words[3:]).split(".")[0]})
  for doc, own in zip(gen[0::2], greedy_until_period(run, [d["prompt"] for d in gen[0::2]])):
    doc["target"] = own
  task_dir.mkdir(exist_ok=True)
  for name, docs in ((MC_TASK, mc), (GEN_TASK, gen)):
    (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "test_split: test\n")
  (task_dir / f"{MC_TASK}.yaml").write_text(
    f"task: {MC_TASK}\n" + common.format(path=task_dir / f"{MC_TASK}.jsonl") +
    "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
    "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (task_dir / f"{GEN_TASK}.yaml").write_text(
    f"task: {GEN_TASK}\n" + common.format(path=task_dir / f"{GEN_TASK}.jsonl") +
    "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
    f"generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n")
  return {MC_TASK: mc, GEN_TASK: gen}


@pytest.fixture(scope="module")
def tasks(trained_run, sample_dir, tmp_path_factory):
  task_dir = tmp_path_factory.mktemp("harness") / "tasks"
  return task_dir, write_tasks(task_dir, sample_dir, trained_run)


@pytest.fixture(scope="module")
def hf_dir(trained_run, tmp_path_factory):
  """Our PyTorch export of the run, written by scripts/export_to_pytorch.py."""
  out = tmp_path_factory.mktemp("hf") / "model"
  script = runpy.run_path(os.path.join(REPO, "scripts", "export_to_pytorch.py"))
  script["main"](["--workdir", str(trained_run), "--out", str(out)])
  return out


def by_doc(results, task):
  return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_log_likelihoods_and_generations_match_the_hf_backend(trained_run, tasks, hf_dir):
  task_dir, docs = tasks
  names = [MC_TASK, GEN_TASK]
  ours = harness.evaluate(str(trained_run), names, include_path=str(task_dir), batch_size=8,
                          log_samples=True)
  theirs = lm_eval.simple_evaluate(
    model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, device="cpu",
    batch_size=8, tasks=names, log_samples=True,
    task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))

  # Multiple choice: every (context, choice) log-likelihood and greedy flag, request by request.
  worst, n_requests, n_long = 0.0, 0, 0
  tok = load_tokenizer(str(trained_run / "tokenizer.model"))
  for a, b, doc in zip(by_doc(ours, MC_TASK), by_doc(theirs, MC_TASK), docs[MC_TASK]):
    assert [r[0] for r in a["arguments"]] == [r[0] for r in b["arguments"]]
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip([r[0] for r in a["resps"]],
                                                  [r[0] for r in b["resps"]]):
      worst = max(worst, abs(float(ll_a) - float(ll_b)))
      assert greedy_a == greedy_b
      n_requests += 1
    n_long += len(tok.encode(doc["context"])) + 1 > 129
  print(f"{n_requests} requests ({n_long * 3} longer than the window): max |ll ours - hf| "
        f"{worst:.2e}")
  assert n_requests == 45 and n_long == 3
  assert worst <= 1e-4

  # Accuracy by hand from the per-sample log-likelihoods: the argmax, raw and per character.
  lls = np.array([[float(r[0][0]) for r in s["resps"]] for s in by_doc(ours, MC_TASK)])
  labels = np.array([d["label"] for d in docs[MC_TASK]])
  lengths = np.array([[len(c) for c in d["choices"]] for d in docs[MC_TASK]], np.float64)
  acc = float(np.mean(lls.argmax(1) == labels))
  acc_norm = float(np.mean((lls / lengths).argmax(1) == labels))
  table = harness.metrics_by_task(ours)
  assert table[MC_TASK]["acc"] == pytest.approx(acc)
  assert table[MC_TASK]["acc_norm"] == pytest.approx(acc_norm)
  assert table[MC_TASK]["acc_stderr"] == pytest.approx(np.std(lls.argmax(1) == labels, ddof=1)
                                                        / np.sqrt(15))
  assert harness.metrics_by_task(theirs)[MC_TASK]["acc"] == pytest.approx(acc)
  print(f"accuracy {acc:.3f}, normalised {acc_norm:.3f} (chance 1/3)")

  # Generation: the same text from both backends, and exact match counted by hand.
  assert len(tok.encode(docs[GEN_TASK][6]["prompt"])) + 1 > 128 - MAX_GEN  # cut on the left
  ours_gen = [s["filtered_resps"][0] for s in by_doc(ours, GEN_TASK)]
  theirs_gen = [s["filtered_resps"][0] for s in by_doc(theirs, GEN_TASK)]
  assert ours_gen == theirs_gen
  hits = [g == d["target"] for g, d in zip(ours_gen, docs[GEN_TASK])]
  assert all(hits[0::2])  # our own greedy continuations, reproduced through the harness
  assert table[GEN_TASK]["exact_match"] == pytest.approx(np.mean(hits))
  print("generations:", ours_gen)


@pytest.mark.slow
def test_padded_batches_score_each_request_as_if_alone(trained_run):
  lm = harness.NanoLlamaLM(str(trained_run), batch_size=2)
  rng = np.random.default_rng(0)
  requests = [(None, rng.integers(4, 512, n - 3).tolist(), rng.integers(4, 512, 3).tolist())
              for n in (5, 9, 40, 70, 200)]
  context = rng.integers(4, 512, 10).tolist()
  greedy = generate.generate(lm.cfg.model, lm.params, [context], 3, eos_id=None)[0]
  requests.append((None, context, greedy))
  got = lm._loglikelihood_tokens(requests)  # pylint: disable=protected-access

  logits_of = jax.jit(lambda p, t: model.apply(model.graph(lm.cfg.model), p, t))
  for (_, ctx, cont), (logp, is_greedy) in zip(requests, got):
    tokens = (ctx + cont)[-129:]  # the last max_seq_len + 1 tokens, alone and unpadded
    logits = np.asarray(logits_of(lm.params, np.array([tokens[:-1]], np.int32))[0],
                        np.float64)[-len(cont):]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    assert logp == pytest.approx(sum(logits[j, t] - logz[j] for j, t in enumerate(cont)),
                                 abs=2e-5)
    assert is_greedy == (logits.argmax(-1).tolist() == cont)
  assert [g for _, g in got] == [False] * 5 + [True]
  # Longest first, 2 rows a call: inputs of 128 and 69 tokens -> 128; 39 and 12 -> 64; 8 and 4
  # -> 16. Three programs for six requests.
  assert [harness.bucket(n, 128) for n in (1, 16, 17, 39, 69, 128)] == [16, 16, 32, 64, 128, 128]
  assert lm._score._cache_size() == 3  # pylint: disable=protected-access


def test_rolling_log_likelihood_matches_the_hf_backend_without_a_second_bos(trained_run, hf_dir,
                                                                           sample_dir):
  texts = [json.loads(line)["text"] for line in open(sample_dir / "validation.jsonl")][:6]
  requests = [Instance("loglikelihood_rolling", {}, (t,), 0, ("rolling", i, 1))
              for i, t in enumerate(texts)]
  ours = harness.NanoLlamaLM(str(trained_run), batch_size=4).loglikelihood_rolling(requests)
  hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4,
            add_bos_token=False)
  theirs = hf.loglikelihood_rolling(requests)
  tok = load_tokenizer(str(trained_run / "tokenizer.model"))
  lengths = [len(tok.encode(t)) for t in texts]
  print("tokens", lengths, "\nours  ", ours, "\ntheirs", theirs)
  assert max(lengths) > 2 * 128  # three windows or more
  np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=1e-4)  # float32 sums of ~1,000
  # Every token is predicted once: the mean is about the run's validation loss.
  final = json.loads(open(trained_run / "metrics.jsonl").read().splitlines()[-1])
  assert -sum(ours) / sum(n + 1 for n in lengths) == pytest.approx(final["eval_loss"], abs=0.15)


@pytest.mark.slow
def test_script_writes_the_results_into_the_workdir(trained_run, tasks, tmp_path, monkeypatch,
                                                    capsys):
  """A relative --workdir, as a user types it; the results land in its downstream/ folder."""
  task_dir, docs = tasks
  shutil.copytree(trained_run, tmp_path / "run")
  monkeypatch.chdir(tmp_path)
  main = runpy.run_path(os.path.join(REPO, "scripts", "eval_downstream.py"))["main"]
  main(["--workdir", "run", "--tasks", f"{MC_TASK},{GEN_TASK}", "--include-path", str(task_dir),
        "--limit", "5", "--batch-size", "4", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert out["step"] == 40 and out["file"] == os.path.join("run", "downstream", "step_40.json")
  saved = json.loads((tmp_path / out["file"]).read_text())
  assert saved["n-samples"][MC_TASK]["effective"] == 5
  assert out["results"][MC_TASK]["acc"] == saved["results"][MC_TASK]["acc,none"]
  assert out["results"][GEN_TASK]["exact_match"] >= 0.6  # docs 0, 2, 4 are the model's own
  assert saved["config"]["step"] == 40 and "samples" not in saved

  with pytest.raises(errors.UsageError) as exit_info:
    main(["--workdir", "run", "--tasks", "nope", "--include-path", str(task_dir)])
  assert exit_info.value.line().startswith("usage error: unknown task(s) nope")

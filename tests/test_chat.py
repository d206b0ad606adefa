"""The chat format: ids and masks by hand, the generation prompt, replies, tokenizer training,
and a fine-tune of a trained run that learns, is evaluated and answers on the assistant's tokens."""

import json

import pytest

from helpers import assistant_tokens, run_script
from nanollama_jax import checkpoint, config, evaluate, generate, train
from nanollama_jax.data import CHAT_SAMPLE, chat, records, sources
from nanollama_jax.data.spm_tokenizer import train_tokenizer
from nanollama_jax.data.tokenizer_source import load as load_tokenizer
from nanollama_jax.data.tokenizer_source import load_or_train_tokenizer

M = records.Message
CONVERSATION = (M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hello!", "Greet back."),
                M("user", "Bye"), M("assistant", "Bye!"))


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return load_tokenizer(str(tokenizer_path))


def test_conversation_ids_and_mask_by_hand(tok):
  e = tok.encode
  ids, trained = chat.Markers(tok).encode(CONVERSATION)
  assert ids.tolist() == [
    1, 4, *e("Be brief."), 7,  # BOS, <|system|> ... <|end|>
    5, *e("Hi"), 7,  # <|user|> ... <|end|>
    6, 8, *e("Greet back."), 9, *e("Hello!"), 7,  # <|assistant|> <think> ... </think> ... <|end|>
    5, *e("Bye"), 7,
    6, *e("Bye!"), 7,
    2]  # EOS
  assert trained.tolist() == (
    [0] * (2 + len(e("Be brief.")) + 1) + [0] * (1 + len(e("Hi")) + 1)
    + [0] + [1] * (1 + len(e("Greet back.")) + 1 + len(e("Hello!")) + 1)
    + [0] * (1 + len(e("Bye")) + 1) + [0] + [1] * (len(e("Bye!")) + 1) + [0])
  assert (len(ids), int(trained.sum())) == (41, 19)
  assert ids.dtype.name == "int32"
  assert records.texts([CONVERSATION]) == ["Be brief.", "Hi", "Greet back.", "Hello!", "Bye",
                                           "Bye!"]


def test_generation_prompt_and_reply(tok):
  e = tok.encode
  assert chat.Markers(tok).prompt("Hi") == [1, 5, *e("Hi"), 7, 6]
  assert chat.Markers(tok).prompt("Hi", system="Be brief.") == [1, 4, *e("Be brief."), 7, 5, *e("Hi"), 7, 6]
  ids, trained = chat.Markers(tok).encode(CONVERSATION[:2], add_generation_prompt=True)
  assert ids.tolist() == chat.Markers(tok).prompt("Hi", system="Be brief.") and not trained.any()
  assert chat.Markers(tok).split_reply([8, *e("hm, a cat"), 9, *e("Hello")]) == ("hm, a cat", "Hello")
  assert chat.Markers(tok).split_reply(e("Hello")) == ("", "Hello")
  assert chat.Markers(tok).split_reply([8, *e("still thinking")]) == ("still thinking", "")


def test_a_tokenizer_trained_on_chat_data_learns_the_message_texts(tmp_path):
  cfg = config.get_default_config().data
  cfg.update(train_files=str(CHAT_SAMPLE / "train.jsonl"), format="chat",
             tokenizer_train_docs=100)
  tok = load_or_train_tokenizer(cfg, 400, str(tmp_path / "run"))
  assert tok.has_chat_tokens and tok.vocab_size == 400
  docs = sources.first_documents(cfg, 100)
  assert len(docs) == 100 and all(isinstance(d, tuple) for d in docs)
  same = train_tokenizer(records.texts(docs), 400, str(tmp_path / "by_hand.model"))
  assert tok.proto == same.proto
  # The stories' words are pieces, the JSON around them is not.
  assert [tok.decode([i]) for i in tok.encode("Once upon a time")] == ["Once", " upon", " a",
                                                                       " time"]
  assert len(tok.encode('{"role": "assistant", "content": "')) > 20


@pytest.mark.slow
def test_a_chat_fine_tune_trains_and_evaluates_the_assistants_tokens(trained_run, tmp_path):
  cfg, pretrained, _ = checkpoint.load_run(str(trained_run))
  tok = load_tokenizer(str(trained_run / "tokenizer.model"))
  cfg.data.update(format="chat", train_files=str(CHAT_SAMPLE / "train.jsonl"),
                  eval_files=str(CHAT_SAMPLE / "validation.jsonl"),
                  tokenizer=str(trained_run / "tokenizer.model"))
  cfg.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=1)
  cfg.train.update(steps=6, init_from=str(trained_run), log_every=1, eval_every=6, eval_steps=100,
                   ckpt_every=0, sample_prompts="Tell me a story about a cat.", sample_tokens=8)
  before = evaluate.perplexity(cfg, pretrained, tok, progress=False)
  workdir = tmp_path / "chat"
  params, last = train.train(cfg, str(workdir))
  hand = assistant_tokens(tok, sources.documents(cfg.data, "eval"))
  assert before["tokens"] == last["eval_tokens"] == hand == 10601
  # 4.713 -> 4.652 on the assistant's tokens in 6 steps: it starts learning to answer.
  assert last["eval_loss"] < before["loss"] - 0.03

  cli = run_script("eval_perplexity.py", "--workdir", "chat", "--json", cwd=tmp_path)
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert json.loads(cli.stdout)["tokens"] == hand

  prompt = "Tell me a short story about a little dog named Max."
  ours = run_script("generate.py", "--workdir", "chat", "--chat", "--prompt", prompt,
                    "--temperature", "0", "--max-new-tokens", "24", "--json", cwd=tmp_path)
  assert ours.returncode == 0, ours.stderr[-2000:]
  out = json.loads(ours.stdout)
  ids = generate.generate(cfg.model, params, [chat.Markers(tok).prompt(prompt)], 24,
                          eos_id=chat.Markers.stop_ids, pad_id=tok.pad_id)[0]
  assert (out["reasoning"][0], out["replies"][0]) == chat.Markers(tok).split_reply(ids)
  assert out["new_tokens"] == [len(ids)] and len(out["replies"][0]) > 20
  refused = run_script("generate.py", "--workdir", "chat", "--system", "Be kind.", "--prompt",
                       "Hi", cwd=tmp_path)
  assert refused.returncode == 2 and "--system needs --chat" in refused.stderr

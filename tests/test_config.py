"""Config validation: each mistake is caught before compiling, with a message that names it."""

import re
import runpy

import pytest

from nanollama_jax import config, data_spec, errors


def load(path):
  return runpy.run_path(path)["get_config"]()


@pytest.fixture
def cfg(sample_dir):
  c = config.get_default_config()
  c.data.train_files = str(sample_dir / "train.jsonl")
  c.data.eval_files = str(sample_dir / "validation.jsonl")
  return c


def test_defaults_and_recipes_are_valid(cfg, sample_dir):
  config.validate(cfg)
  config.validate(load("configs/tinystories.py"), check_files=False)
  chat = load("configs/tinystories_chat.py")
  assert chat.data.format == "chat" and chat.model == load("configs/tinystories_cpu.py").model
  config.validate(chat, check_files=False)  # it starts from the run the README trains
  cpu = load("configs/tinystories_cpu.py")
  cpu.data.train_files = cfg.data.train_files
  cpu.data.eval_files = cfg.data.eval_files
  config.validate(cpu)


@pytest.mark.parametrize("recipe", ["configs/tinyllama_1b.py", "configs/llama3_2_1b.py"])
def test_the_mixture_in_a_recipe_docstring_is_valid(recipe):
  docstring = runpy.run_path(recipe)["__doc__"]
  override = re.search(r"--config\.data\.mixture='([^']+)'", docstring).group(1)
  cfg = load(recipe)
  cfg.data.mixture = override
  config.validate(cfg)  # every entry is a Hub source: nothing to find on disk
  assert [w for _, w in data_spec.parse_mixture(override)] == [0.7, 0.2, 0.1]


@pytest.mark.parametrize("mutate, message", [
  (lambda c: c.model.__setattr__("n_layer", 4),
   "unknown config key 'model.n_layer'"),
  (lambda c: c.__setattr__("trainer", config.ml_collections.ConfigDict({"steps": 1})),
   "unknown config key 'trainer'"),
  (lambda c: c.model.update(dim=0), "model.dim=0: must be a positive integer"),
  (lambda c: c.data.update(batch_size=-8), "data.batch_size=-8: must be a positive integer"),
  (lambda c: c.model.update(dim=500, n_heads=8),
   "model.dim=500: must be divisible by model.n_heads=8"),
  (lambda c: c.model.update(dim=24, n_heads=8),
   "dim / n_heads = 3 must be even"),
  (lambda c: c.model.update(n_heads=8, n_kv_heads=3),
   "model.n_kv_heads=3: must divide model.n_heads=8"),
  (lambda c: c.data.update(seq_len=4096),
   "data.seq_len=4096: must be <= model.max_seq_len=2048"),
  (lambda c: c.optim.update(warmup_steps=2000),
   "optim.warmup_steps=2000: is longer than the run: must be <= train.steps=1000"),
  (lambda c: c.optim.update(min_lr=1.0),
   "optim.min_lr=1.0: must be between 0 and optim.lr=0.0003"),
  (lambda c: c.optim.update(b2=1.0), "optim.b2=1.0: must be in [0, 1)"),
  (lambda c: c.optim.update(grad_accum=3),
   "data.batch_size=32: must be divisible by optim.grad_accum=3"),
  (lambda c: c.model.update(attention="flash"), "model.attention='flash': allowed: xla"),
  (lambda c: c.model.update(dtype="fp8"), "model.dtype='fp8': allowed: float32, bfloat16"),
  (lambda c: c.model.update(remat="some"), "model.remat='some': allowed: none, full"),
  (lambda c: c.data.update(format="sharegpt"), "data.format='sharegpt': allowed: text, chat"),
  (lambda c: c.model.update(rope_scaling={"factor": 8.0}),
   "model.rope_scaling={'factor': 8.0}: must be None or have exactly the keys"),
  (lambda c: c.model.update(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0,
                                          "high_freq_factor": 1.0,
                                          "original_max_position_embeddings": 8192}),
   "model.rope_scaling.high_freq_factor=1.0: must be > low_freq_factor=4.0"),
  (lambda c: c.data.update(source="s3"), "data.source='s3': allowed: files, hf"),
  (lambda c: c.data.update(train_files="/nonexistent/*.jsonl"),
   "data.train_files='/nonexistent/*.jsonl': no file matches '/nonexistent/*.jsonl'"),
  (lambda c: c.data.update(train_files=""), "data.train_files is empty"),
  (lambda c: c.data.update(eval_files="/nope.jsonl"),
   "data.eval_files='/nope.jsonl': no file matches"),
  (lambda c: c.data.update(tokenizer="/missing/tok.model"),
   "data.tokenizer='/missing/tok.model': no such file"),
  (lambda c: c.train.update(keep_ckpts=0), "train.keep_ckpts=0: must be a positive integer"),
  (lambda c: c.train.update(ckpt_every=-5), "train.ckpt_every=-5: must be an integer >= 0"),
  (lambda c: c.train.update(max_bad_steps=0),
   "train.max_bad_steps=0: must be a positive integer"),
  (lambda c: c.train.update(init_from="/missing/run"),
   "train.init_from='/missing/run': no such directory"),
  (lambda c: c.train.update(init_from="hf:nope"), "train.init_from='hf:nope': a Hub name is"),
  (lambda c: c.data.update(tokenizer="hf:a/b@"), "data.tokenizer='hf:a/b@': a Hub name is"),
  (lambda c: c.train.update(sample_every=0), "train.sample_every=0: must be a positive integer"),
  (lambda c: c.wandb.update(mode="disabled"), "wandb.mode='disabled': allowed: online, offline"),
  # Every cadence counts steps: a push (of a checkpoint) every 1 step is refused, not read as
  # "every checkpoint", which it meant before.
  (lambda c: c.train.update(push_to_hub="me/run", push_every=1, ckpt_every=500),
   "train.push_every=1: counts steps between pushes, and a push uploads a checkpoint: must be a "
   "multiple of train.ckpt_every=500, or 0 to push every checkpoint"),
  (lambda c: c.train.update(push_to_hub="me/run", push_every=100, ckpt_every=0),
   "must be 0 when train.ckpt_every=0"),
])
def test_validation_errors(cfg, mutate, message):
  mutate(cfg)
  with pytest.raises(errors.ConfigError) as err:
    config.validate(cfg)
  assert message in str(err.value)


def test_json_round_trip(cfg):
  cfg.model.rope_scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
  again = config.from_json(config.to_json(cfg))
  assert again.to_dict() == cfg.to_dict()
  with pytest.raises(errors.ConfigError, match="unknown config key 'model.depth'"):
    config.from_json('{"model": {"depth": 3}}')


def test_expand_globs_sorts_and_dedups(sample_dir):
  pattern = f"{sample_dir}/*.jsonl, {sample_dir}/train.jsonl"
  files = data_spec.expand_globs(pattern, "data.train_files")
  assert [f.rsplit("/", 1)[1] for f in files] == ["train.jsonl", "validation.jsonl"]

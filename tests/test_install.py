"""Installs: the extras in pyproject.toml and the refusals when one is missing."""

import importlib.util
import os
import re

import pytest

from helpers import REPO
from nanollama_jax import config, errors


def _name(requirement: str) -> str:
  """The distribution a requirement names, normalised (PEP 503): lm_eval -> lm-eval."""
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _extras() -> dict[str, list[str]]:
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["optional-dependencies"]


def _hide(monkeypatch, *modules: str) -> None:
  """find_spec() answers None for `modules`, as it does where they are not installed."""
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name in modules else find_spec(name, *args))


def _pip_command(extra: str) -> str:
  return f"pip install 'nanollama_jax[{extra}]' (or pip install -e \".[{extra}]\" in a clone)"


def test_each_extra_installs_the_modules_its_features_check():
  extras = _extras()
  assert set(errors.EXTRAS) <= set(extras)
  for extra, modules in errors.MODULES.items():
    assert {_name(m) for m in modules} <= {_name(r) for r in extras[extra]}, extra


def test_the_test_extra_is_the_feature_extras_and_the_test_tools():
  extras = _extras()
  assert "nanollama_jax[hf,plot,eval]" in extras["test"]
  features = {_name(r) for extra in ("hf", "plot", "eval") for r in extras[extra]}
  assert not features & {_name(r) for r in extras["test"]}  # composed, not repeated
  # torch only where the tests run the export in transformers, and pinned exactly (a looser
  # requirement pulls several GB of CUDA wheels).
  assert [(e, r) for e, reqs in extras.items() for r in reqs if _name(r) == "torch"] == [
    ("test", "torch==2.13.0")]


def test_require_names_what_is_missing_and_the_pip_command(monkeypatch, capsys):
  errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face")  # installed: no error
  _hide(monkeypatch, "transformers", "tokenizers")
  with pytest.raises(errors.InstallError) as e:
    errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face")
  assert str(e.value) == ("export to Hugging Face needs tokenizers, transformers: "
                          + _pip_command("hf"))
  with pytest.raises(SystemExit) as stop:
    errors.cli(lambda: errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face"))
  assert stop.value.code == 2
  assert capsys.readouterr().err == f"install error: {e.value}\n"


@pytest.fixture
def sample_cfg(sample_dir):
  cfg = config.get_default_config()
  cfg.data.update(dict(train_files=str(sample_dir / "train.jsonl"),
                       eval_files=str(sample_dir / "validation.jsonl")))
  return cfg


def test_validate_refuses_a_push_to_the_hub_without_the_hf_extra(sample_cfg, monkeypatch):
  sample_cfg.train.push_to_hub = "me/run"
  config.validate(sample_cfg)
  _hide(monkeypatch, "safetensors", "transformers")
  with pytest.raises(config.ConfigError) as e:
    config.validate(sample_cfg)
  assert str(e.value) == ("train.push_to_hub='me/run': pushing to the Hub needs safetensors, "
                          f"transformers: {_pip_command('hf')}")
  config.validate(sample_cfg, check_files=False)  # compiled on another machine: no extra needed


def test_validate_refuses_init_from_a_hugging_face_directory_without_the_hf_extra(
    sample_cfg, tmp_path, monkeypatch):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_bytes(b"")
  (tmp_path / "run" / "checkpoints" / "5" / "params").mkdir(parents=True)
  _hide(monkeypatch, "safetensors")
  sample_cfg.train.init_from = str(hf)
  with pytest.raises(config.ConfigError) as e:
    config.validate(sample_cfg)
  assert str(e.value) == (f"train.init_from='{hf}': reading a Hugging Face directory needs "
                          f"safetensors: {_pip_command('hf')}")
  sample_cfg.train.init_from = str(tmp_path / "run")  # an orbax workdir needs no extra
  config.validate(sample_cfg)

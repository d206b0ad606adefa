"""Installs: the extras in pyproject.toml, the refusals when one is missing, and the README's
quickstart in a fresh virtual environment (slow: it installs the package from the registry)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import test_docs
from helpers import REPO, cpu_env
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
  assert "nanollama_jax[hf,plot,eval,gcs,wandb]" in extras["test"]
  features = {_name(r) for extra in ("hf", "plot", "eval", "gcs", "wandb") for r in extras[extra]}
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
  with pytest.raises(errors.ConfigError) as e:
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
  with pytest.raises(errors.ConfigError) as e:
    config.validate(sample_cfg)
  assert str(e.value) == (f"train.init_from='{hf}': reading Hugging Face weights needs "
                          f"safetensors: {_pip_command('hf')}")
  sample_cfg.train.init_from = str(tmp_path / "run")  # an orbax workdir needs no extra
  config.validate(sample_cfg)


# --- The README's quickstart in a fresh virtual environment --------------------------------------

# The README's first blocks, in the order tests/test_docs.py checks: the quickstart (venv, install,
# train from the Hub), the tests, training on the shipped sample, then evaluate, sample, plot and
# export that run.
QUICKSTART, _, TRAIN_SAMPLE, AFTER_TRAINING = test_docs.blocks("README.md")[:4]
INSTALL = next(part.strip() for part in QUICKSTART.body.split("&&")
               if part.strip().startswith("pip install"))
# What each post-training command shows: the start of what it prints, or the file it writes.
PRINTS = {"eval_perplexity.py": r"step 4: loss \d+\.\d+, perplexity \d+\.\d+ over ",
          "generate.py": "Once upon a time"}
WRITES = {"plot_metrics.py": "loss.png", "export_to_pytorch.py": "hf_model/model.safetensors"}


class Venv:
  """A copy of the repository (without .git, venvs, runs and build output) and a venv beside it."""

  def __init__(self, root):
    self.clone = root / "clone"
    shutil.copytree(REPO, self.clone, ignore=shutil.ignore_patterns(
      ".git", ".ci", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    self.bin = root / "venv" / "bin"
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    # One CPU device, as a user has; PYTHONPATH (a checkout's) would hide the venv's install.
    self.env = {k: v for k, v in cpu_env(1).items() if k != "PYTHONPATH"}
    self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                    VIRTUAL_ENV=str(root / "venv"))
    self.seconds: dict[str, float] = {}

  def run(self, command: str, what: str) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=self.clone, env=self.env,
                          capture_output=True, text=True, timeout=1200)
    self.seconds[what] = time.monotonic() - start
    return proc

  def ok(self, command: str, what: str) -> subprocess.CompletedProcess:
    proc = self.run(command, what)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc

  def has(self, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return self.run(f"python -c {probe!r}", f"find {module}").returncode == 0


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
  """The package alone (`pip install -e .`): what the README's extras are added to."""
  venv = Venv(tmp_path_factory.mktemp("install"))
  venv.ok("pip install -e .", "pip install -e .")
  return venv


@pytest.fixture(scope="module")
def readme_venv(base_venv):
  """The same venv after the README's own install line (pytest runs the base test first: a
  module's tests run in file order)."""
  base_venv.ok(INSTALL, INSTALL)
  return base_venv


@pytest.mark.slow
def test_without_the_extras_plot_export_and_a_hub_push_are_refused_in_one_line(base_venv):
  venv = base_venv
  assert not venv.has("transformers") and not venv.has("matplotlib")
  run = venv.clone / "runs" / "fake"
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0, "tokens_seen": 64}\n')
  refusals = {  # command: (the line before the pip command, the extra it names)
    "python scripts/export_to_pytorch.py --workdir runs/fake --out hf_model":
      (r"install error: export to Hugging Face needs [a-z_, ]*transformers[a-z_, ]*: ", "hf"),
    "python scripts/plot_metrics.py --workdir runs/fake --out loss.png":
      (r"install error: plotting needs matplotlib: ", "plot"),
    f"{test_docs.TRAIN} --config configs/tinystories_cpu.py --workdir runs/push "
    "--config.train.push_to_hub=me/run":
      (r"config error: train.push_to_hub='me/run': pushing to the Hub needs [a-z_, ]*: ", "hf"),
  }
  for command, (line, extra) in refusals.items():
    proc = venv.run(command, command)
    assert proc.returncode == 2, (command, proc.stderr[-3000:])
    assert re.fullmatch(line + re.escape(_pip_command(extra)) + "\n", proc.stderr), proc.stderr
  assert not (venv.clone / "runs" / "push").exists()  # refused before the run began


@pytest.mark.slow
def test_the_readme_install_runs_the_readme_commands(readme_venv):
  venv = readme_venv
  assert not venv.has("torch")  # the hf extra exports without torch
  venv.ok(test_docs._script(TRAIN_SAMPLE, TRAIN_SAMPLE.body), "train")
  assert (venv.clone / "runs/ts_sample/checkpoints/4").is_dir()
  commands = test_docs._commands(AFTER_TRAINING.body)
  scripts = [os.path.basename(c.split()[1]) for c in commands]
  assert sorted(scripts) == sorted({**PRINTS, **WRITES})
  for command, script in zip(commands, scripts):
    proc = venv.ok(command, script)
    if script in PRINTS:
      assert re.match(PRINTS[script], proc.stdout), (command, proc.stdout)
    else:
      assert (venv.clone / WRITES[script]).stat().st_size > 1000, command
  assert (venv.clone / "loss.png").read_bytes()[:4] == b"\x89PNG"
  print("seconds:", {k: round(v, 1) for k, v in venv.seconds.items()})

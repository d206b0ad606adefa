"""Every command the README and docs/ show is run here, so the docs cannot drift from the code.

Each ```bash block carries a comment right above it that says how CI treats it:
  <!-- ci: run -->              each command runs exactly as written
  <!-- ci: run with ARGS -->    training commands get ARGS appended (fewer steps), the rest as is
  <!-- ci: dry-run -->          training commands run with --dry_run (they need the Hub, a GPU
                                cluster or hours); environment set-up in the same line is skipped
  <!-- ci: skip: REASON -->     not run, for the reason given
Blocks run in order (README first) in one scratch directory that links configs/, scripts/ and the
package, so a later page can use the run an earlier one trained.
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import REPO

PAGES = ["README.md", "docs/data.md", "docs/training.md", "docs/evaluation.md",
         "docs/checkpoints.md", "docs/devices.md", "docs/attention.md", "docs/performance.md"]
TRAIN = "python -m nanollama_jax.train"
SET_UP = ("python3 -m venv", ". .venv/bin/activate", "pip install")
_BLOCK = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
_NOTE = re.compile(r"<!-- ci: (?P<mode>run with|run|dry-run|skip)(?::? ?(?P<arg>.*?))? -->\s*$")


@dataclasses.dataclass
class Block:
  where: str
  mode: str
  arg: str
  commands: list[str]


def _commands(body: str) -> list[str]:
  """The block's commands: comment lines dropped, backslash continuations joined."""
  joined = re.sub(r"\\\n\s*", " ", body)
  return [line.strip() for line in joined.splitlines()
          if line.strip() and not line.strip().startswith("#")]


def blocks(page: str) -> list[Block]:
  text = (pathlib.Path(REPO) / page).read_text()
  found = []
  for m in _BLOCK.finditer(text):
    if m.group("lang") not in ("bash", "sh"):
      continue
    where = f"{page}:{text[:m.start()].count(chr(10)) + 1}"
    before = text[:m.start()].rstrip("\n").splitlines()
    note = _NOTE.search(before[-1]) if before else None
    if note is None:
      found.append(Block(where, "", "", []))
      continue
    found.append(Block(where, note.group("mode"), (note.group("arg") or "").strip(),
                       _commands(m.group("body"))))
  return found


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_shell_block_says_how_ci_runs_it():
  assert len(ALL) >= 10
  unmarked = [b.where for b in ALL if not b.mode]
  assert not unmarked, f"```bash blocks without a <!-- ci: ... --> note: {unmarked}"
  assert all(b.arg for b in ALL if b.mode in ("skip", "run with")), "skips need a reason"
  # The commands a user types first are run, not skipped.
  assert [b.mode for b in blocks("README.md")][:4] == ["dry-run", "skip", "run with", "run"]


def _to_run(block: Block) -> list[str]:
  """The shell commands CI runs for `block`."""
  runs = []
  for command in block.commands:
    if block.mode == "dry-run":
      parts = [p.strip() for p in command.split("&&")]
      extra = [p for p in parts if not p.startswith(SET_UP) and not p.startswith(TRAIN)]
      assert not extra, f"{block.where}: a dry-run block runs only training commands: {extra}"
      runs += [f"{p} --dry_run" for p in parts if p.startswith(TRAIN)]
    elif block.mode == "run with" and command.startswith(TRAIN):
      runs.append(f"{command} {block.arg}")
    else:
      runs.append(command)
  return runs


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  """A directory that looks like the repository root to the commands, with `python` this one."""
  root = tmp_path_factory.mktemp("docs")
  for name in ("configs", "scripts", "nanollama_jax"):
    (root / name).symlink_to(pathlib.Path(REPO) / name)
  # `python` is this interpreter (a virtual environment's bin/ holds a `python` beside it).
  bin_dir = os.path.dirname(sys.executable)
  assert os.path.samefile(os.path.join(bin_dir, "python"), sys.executable)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  return root, env


def test_documented_commands_work_as_shown(scratch):
  root, env = scratch
  ran = 0
  for block in ALL:
    if block.mode == "skip":
      continue
    for command in _to_run(block):
      proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
      assert proc.returncode == 0, (f"{block.where}: `{command}` failed:\n"
                                    f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
      if "--dry_run" in command:
        assert "dry run: the config is valid" in proc.stdout, (block.where, proc.stdout)
      ran += 1
  assert ran >= 12
  # What the README's commands left behind: a run, a plot and a Hugging Face export.
  assert (root / "runs/ts_sample/checkpoints/4").is_dir()
  assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert (root / "hf_model/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask

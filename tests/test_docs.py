"""Every command the README and docs/ show is run here, so the docs cannot drift from the code.

Each ```bash block carries a comment right above it that says how CI treats it:
  <!-- ci: run -->              the block runs exactly as written, as one bash script
  <!-- ci: run with ARGS -->    as written, with ARGS appended to its training commands (fewer
                                steps)
  <!-- ci: dry-run -->          its commands run with --dry_run (training) or --dry-run (scripts):
                                they need the Hub, a GPU cluster or hours; environment set-up in
                                the same line is skipped
  <!-- ci: skip: REASON -->     not run, for the reason given
Blocks run in order (README first) in one scratch directory that links configs/, scripts/ and the
package, so a later page can use the run an earlier one trained.
"""

import dataclasses
import os
import pathlib
import re
import textwrap
import subprocess
import sys

import pytest

from helpers import REPO

PAGES = ["README.md", "docs/data.md", "docs/training.md", "docs/chat.md", "docs/evaluation.md",
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
  body: str


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
    body = textwrap.dedent(m.group("body"))
    if note is None:
      found.append(Block(where, "", "", body))
      continue
    found.append(Block(where, note.group("mode"), (note.group("arg") or "").strip(), body))
  return found


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_shell_block_says_how_ci_runs_it():
  assert len(ALL) >= 10
  unmarked = [b.where for b in ALL if not b.mode]
  assert not unmarked, f"```bash blocks without a <!-- ci: ... --> note: {unmarked}"
  assert all(b.arg for b in ALL if b.mode in ("skip", "run with")), "skips need a reason"
  # The commands a user types first are run, not skipped.
  assert [b.mode for b in blocks("README.md")][:4] == ["dry-run", "skip", "run with", "run"]


SCRIPT = "python scripts/"


def _script(block: Block, body: str) -> str:
  """The bash script CI runs for `block` (its text with continuation lines joined)."""
  lines = re.sub(r"\\\n\s*", " ", body).splitlines()
  if block.mode == "run with":
    return "\n".join(f"{line} {block.arg}" if line.strip().startswith(TRAIN) else line
                     for line in lines)
  if block.mode == "run":
    return "\n".join(lines)
  runs = []  # dry-run
  for command in _commands(body):
    for part in (p.strip() for p in command.split("&&")):
      if part.startswith(TRAIN):
        runs.append(f"{part} --dry_run")
      elif part.startswith(SCRIPT):  # before a `--` that passes the rest on to the trainer
        runs.append(part.replace(" -- ", " --dry-run -- ", 1) if " -- " in part
                    else f"{part} --dry-run")
      else:
        assert part.startswith(SET_UP), f"{block.where}: `{part}` cannot be dry-run"
  return "\n".join(runs)


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


@pytest.mark.slow
def test_documented_commands_work_as_shown(scratch):
  root, env = scratch
  ran = 0
  for block in ALL:
    if block.mode == "skip":
      continue
    script = _script(block, block.body)
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (f"{block.where}: failed:\n{script}\n---\n"
                                  f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    if block.mode == "dry-run":
      assert proc.stdout.count("dry run: ") == script.count("\n") + 1, (block.where, proc.stdout)
    ran += 1
  assert ran >= 10
  # What the README's commands left behind: a run, a plot and a Hugging Face export.
  assert (root / "runs/ts_sample/checkpoints/4").is_dir()
  assert (root / "runs/ts_chat/checkpoints/4").is_dir()  # docs/chat.md's fine-tune of it
  assert b'"chat_template"' in (root / "hf_chat/tokenizer_config.json").read_bytes()
  assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert (root / "hf_model/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask

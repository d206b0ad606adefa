"""Pushing checkpoints to the Hub: the real huggingface_hub calls, against a Hub on 127.0.0.1."""

import base64
import json
import logging as std_logging
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from safetensors.numpy import load

from helpers import tiny_config
from nanollama_jax import checkpoint, errors, export, hub, train


class FakeHub:
  """The Hub endpoints that create_repo and upload_folder call, keeping what was committed.

  `refuse` commits are answered 403 (a repository the token may not write to) before any is
  accepted.
  """

  def __init__(self, refuse: int = 0):
    self.refuse = refuse
    self.commits: list[dict] = []  # {"message", "files": {path: bytes}}
    self.tokens: set[str] = set()
    owner = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args):
        del args

      def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_POST(self):  # noqa: N802 (the http.server name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        owner.tokens.add(self.headers.get("Authorization", ""))
        if self.path == "/api/repos/create":
          repo = json.loads(body)
          self._reply(200, {"url": f"{owner.url}/{repo['organization']}/{repo['name']}"})
        elif self.path == "/api/validate-yaml":
          self._reply(200, {})
        elif "/preupload/" in self.path:
          files = json.loads(body)["files"]
          self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                       "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
          if owner.refuse:
            owner.refuse -= 1
            self._reply(403, {"error": "You don't have the rights to create a commit here"})
            return
          lines = [json.loads(line) for line in body.splitlines() if line.strip()]
          files = {op["value"]["path"]: base64.b64decode(op["value"]["content"])
                   for op in lines if op["key"] == "file"}
          message = next(op["value"]["summary"] for op in lines if op["key"] == "header")
          owner.commits.append({"message": message, "files": files})
          repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
          oid = f"{len(owner.commits):040x}"
          self._reply(200, {"commitUrl": f"{owner.url}/{repo}/commit/{oid}", "commitOid": oid})
        else:
          self._reply(404, {"error": f"no such endpoint {self.path}"})

    self._server = HTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever)
    self._thread.start()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()


@pytest.fixture
def fake_hub(monkeypatch):
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  server = FakeHub()
  monkeypatch.setattr(constants, "ENDPOINT", server.url)  # this process
  monkeypatch.setenv("HF_ENDPOINT", server.url)  # the trainer's push processes
  monkeypatch.setenv("HF_TOKEN", "hf_test_token")
  yield server
  server.close()


def test_a_push_uploads_the_export_and_a_model_card(trained_run, fake_hub):
  url = hub.push(str(trained_run), "me/tiny", step=20)
  assert url == f"{fake_hub.url}/me/tiny/commit/{1:040x}"
  (commit,) = fake_hub.commits
  assert commit["message"] == f"step 20 of {trained_run.name}"
  assert set(commit["files"]) >= {"README.md", "config.json", "generation_config.json",
                                  "model.safetensors", "tokenizer.json", "tokenizer.model",
                                  "tokenizer_config.json"}
  assert fake_hub.tokens == {"Bearer hf_test_token"}
  # The uploaded weights are checkpoint 20's, exactly.
  cfg, params, _ = checkpoint.load_run(str(trained_run), 20)
  uploaded = load(commit["files"]["model.safetensors"])
  for name, value in export.to_hf_tensors(params, cfg.model).items():
    np.testing.assert_array_equal(uploaded[name], value, err_msg=name)
  card = commit["files"]["README.md"].decode()
  rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  at_20 = [r for r in rows if r["step"] == 20 and "loss" in r][0]
  assert f"- train loss: {at_20['loss']:.4f}" in card
  assert f"- tokens seen: {at_20['tokens_seen']:,}" in card
  assert "- step: 20 of 40" in card and "dim 64, 2 layers" in card


def test_a_damaged_checkpoint_is_never_pushed(trained_run, tmp_path, fake_hub):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  # Flip bytes in the middle of the parameters' data files: the fingerprint check fails.
  data = [p for p in (run / "checkpoints" / "40" / "params").rglob("*")
          if p.is_file() and p.stat().st_size > 4096]
  for path in data:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))
  with pytest.raises(errors.CheckpointError, match="damaged"):  # unreadable or mismatched
    hub.push(str(run), "me/tiny", step=40)
  assert not fake_hub.commits


@pytest.mark.slow
def test_training_pushes_in_the_background_and_survives_a_refused_upload(
    sample_dir, tokenizer_path, tmp_path, fake_hub, caplog):
  fake_hub.refuse = 1  # the first push is refused; the run goes on and the next one lands
  cfg = tiny_config(sample_dir, tokenizer_path, steps=4, log_every=1, ckpt_every=2,
                    eval_every=4, eval_steps=2, push_to_hub="me/run", push_every=2)
  cfg.optim.warmup_steps = 1
  with caplog.at_level(std_logging.INFO):
    _, last = train.train(cfg, str(tmp_path / "run"))
  assert last["loss"] > 0
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == std_logging.WARNING and "push of checkpoint" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint 2 to me/run failed" in warnings[0]
  assert "403 Forbidden" in warnings[0]
  assert any("pushed checkpoint 4 to the Hub" in r.getMessage() for r in caplog.records)
  assert [c["message"] for c in fake_hub.commits] == ["step 4 of run"]
  assert "- step: 4 of 4" in fake_hub.commits[0]["files"]["README.md"].decode()
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]

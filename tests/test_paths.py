"""The workdir's path layer: local semantics, URIs left alone, and the object-store mode of the
metrics file (rewritten whole, since objects cannot be appended to), run on a local directory."""

import json

from nanollama_jax import paths, tracking


def test_local_paths_and_uris():
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "checkpoints", "4") == "gs://bucket/run/checkpoints/4"
  assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b/x")
  assert not paths.is_remote("runs/x") and not paths.is_remote("/abs/gs://x")


def test_write_move_list_remove_on_a_disk(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.listdir("runs") == []  # missing: nothing, not an error
  paths.write("runs/x/config.json", '{"a": 1}')
  paths.write("runs/x/tokenizer.model", b"\x00\x01")
  assert paths.listdir("runs/x") == ["config.json", "tokenizer.model"]  # no temporary left
  assert json.loads(paths.read_text("runs/x/config.json")) == {"a": 1}
  paths.write("runs/x/config.json", '{"a": 2}')  # replaced whole
  assert paths.read_text("runs/x/config.json") == '{"a": 2}'
  paths.move("runs/x", "runs/damaged/x-1")
  assert paths.listdir("runs") == ["damaged"]
  assert paths.read_bytes("runs/damaged/x-1/tokenizer.model") == b"\x00\x01"
  paths.remove("runs/damaged")
  paths.remove("runs/damaged")  # already gone: fine
  assert paths.listdir("runs") == []


def _rows(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_in_an_object_store_are_rewritten_whole(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "is_remote", lambda path: True)  # this directory as a bucket
  writer = tracking.Jsonl(str(tmp_path))
  for step in (1, 2, 3):
    writer.log(step, {"loss": 1.0 / step})
  assert _rows(tmp_path / "metrics.jsonl") == []  # not appended row by row
  writer.REMOTE_FLUSH_S = 0.0
  writer.log(4, {"loss": 0.25})  # the flush interval passed: the whole file is rewritten
  assert _rows(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
  writer.REMOTE_FLUSH_S = 3600.0
  writer.log(5, {"loss": 0.2})
  writer.close()  # and at close
  assert _rows(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
  # A run resumed from step 3 drops the rows logged after it, as on a disk.
  resumed = tracking.Jsonl(str(tmp_path), start_step=3)
  resumed.log(4, {"loss": 0.3})
  resumed.close()
  assert _rows(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]

"""A Cloud Storage emulator for tests of gs:// workdirs, and the variables that send each client
library of such a workdir to it.

gcp-storage-emulator serves the JSON API (resumable and multipart uploads, rewrite, compose) from
memory, in a thread of the test process. A gs:// workdir has three clients, each pointed at the
emulator its own way (Emulator.env):

- gcsfs, through etils.epath (config, tokenizer, metrics.jsonl, orbax's small files):
  STORAGE_EMULATOR_HOST, scheme included. FSSPEC_GS_TOKEN=anon is fsspec's way to give every gcsfs
  filesystem token="anon": no credentials, instead of a search for some (application default
  credentials, gcloud's, the GCE metadata server). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false selects
  gcsfs's JSON-API filesystem, the one a standard bucket gets: the default one first asks the
  Storage Control gRPC API for the bucket's layout, at the emulator's address, which speaks no
  gRPC; with the anonymous token every call then waits for 60 s of failed TLS handshakes before it
  falls back to the JSON API (a write and a listing took 264 s).
- google-cloud-storage, through tensorboardX (TensorBoard's event files): STORAGE_EMULATOR_HOST;
  with it the client uses anonymous credentials by itself.
- tensorstore's gcs driver (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, and
  GOOGLE_AUTH_TOKEN_FOR_TESTING, a fixed bearer token sent instead of a search for credentials
  (which off Google Cloud ends in retries against the GCE metadata server and an error logged,
  then requests without credentials).

`running` fills two gaps of the emulator:

- Cloud Storage names an object's generation in the x-goog-generation header of a download; the
  emulator does not. tensorstore reads the generation of an object it downloads
  (GET /storage/v1/b/B/o/O?alt=media) from that header only, so it takes 0 for an object that
  exists. The OCDBT manifest of an orbax checkpoint is read, then rewritten on the condition that
  its generation is unchanged, and tensorstore refuses the condition on generation 0
  ("Malformed StorageGeneration"): a save fails whenever one writer of a manifest reads it after
  another created it. The emulator's downloads get the header.
- The emulator lacks Objects: move (POST /storage/v1/b/B/o/SRC/moveTo/o/DST) and answers 501,
  which gcsfs retries for 15 s per object before it copies and deletes instead. It gets a move
  made of its copy and a delete.

It also ignores generation conditions: a conflicting write is not refused, which tests with one
writer do not notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from http import HTTPStatus
from unittest import mock

from helpers import free_port


@dataclasses.dataclass(frozen=True)
class Emulator:
  url: str  # http://127.0.0.1:PORT
  bucket: str

  @property
  def env(self) -> dict[str, str]:
    """The environment variables that send every client of a gs:// workdir to the emulator."""
    return {"STORAGE_EMULATOR_HOST": self.url, "FSSPEC_GS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

  def uri(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def _bucket(self):
    # pylint: disable=import-outside-toplevel
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": self.url})
    return client.bucket(self.bucket)

  def names(self, prefix: str) -> list[str]:
    """The names of the objects under `prefix`/, relative to it, sorted."""
    blobs = self._bucket().list_blobs(prefix=prefix.rstrip("/") + "/")
    return sorted(b.name[len(prefix.rstrip("/")) + 1:] for b in blobs)

  def read(self, name: str) -> bytes:
    return self._bucket().blob(name).download_as_bytes()


def _with_generation(download):
  """The emulator's object download, which also names the object's generation in the headers."""

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  return download_with_generation


def _move_route(objects):
  """The route of Objects: move, served by the emulator's copy and then a delete."""

  def move(request, response, storage, *args, **kwargs):
    params = request.params  # the request keeps this dict: the copy handler reads it
    params["dest_bucket_name"] = params["bucket_name"]
    objects.copy(request, response, storage, *args, **kwargs)
    if response.status == HTTPStatus.OK:
      storage.delete_file(params["bucket_name"], params["object_id"])

  pattern = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
             r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  return pattern, {"POST": move}


def _quiet(handler_class):
  """The emulator's request handler, silent about clients that hang up before the answer: gcsfs
  asks for an object and for a listing under its name at once and drops the slower answer, and
  each such request would print a BrokenPipeError traceback."""

  class QuietHandler(handler_class):
    def handle(self):
      try:
        super().handle()
      except (BrokenPipeError, ConnectionResetError):
        pass

  return QuietHandler


@contextlib.contextmanager
def running(bucket: str) -> Iterator[Emulator]:
  """An emulator on 127.0.0.1 that holds the empty `bucket` in memory, stopped on exit."""
  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator import server as server_lib
  from gcp_storage_emulator.handlers import objects
  port = free_port()
  server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  log = logging.getLogger("gcp_storage_emulator")
  level = log.level
  log.setLevel(logging.CRITICAL)  # not an error for each object asked for before it exists
  # objects.get serves ?alt=media through the module's download function; the router reads
  # HANDLERS and RequestHandler at each request.
  with mock.patch.object(objects, "download", _with_generation(objects.download)), \
       mock.patch.object(server_lib, "HANDLERS", (_move_route(objects), *server_lib.HANDLERS)), \
       mock.patch.object(server_lib, "RequestHandler", _quiet(server_lib.RequestHandler)):
    server.start()
    try:
      yield Emulator(f"http://127.0.0.1:{port}", bucket)
    finally:
      server.stop()
      log.setLevel(level)

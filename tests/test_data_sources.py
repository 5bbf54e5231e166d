"""Sources: local files, pinned urls (a real HTTP server on localhost), the HF cache; offline behaviour."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from types import SimpleNamespace

import pytest

from pipeline.data.sources import SourceError, fetch_hf, fetch_url, resolve_source, url_cache_path

BODY = (json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}) + "\n").encode()
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture()
def server(tmp_path):
    """A real HTTP server serving tmp_path/www; yields (base url, request log)."""
    www = tmp_path / "www"
    (www / "repo" / "abc123").mkdir(parents=True)
    (www / "repo" / "abc123" / "data.jsonl").write_bytes(BODY)
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


def test_url_download_verify_and_cache(server, online, tmp_path, monkeypatch):
    base, log = server
    url = f"{base}/repo/abc123/data.jsonl"
    raw = tmp_path / "raw"
    f = fetch_url(url, raw, SHA)
    assert f.downloaded and f.sha256 == SHA and f.path.read_bytes() == BODY
    assert f.path == url_cache_path(url, raw) and f.path.parts[-3:] == ("repo", "abc123", "data.jsonl")
    assert not list(f.path.parent.glob("*.part"))
    # second call: served from the cache, no request
    n = len(log)
    g = fetch_url(url, raw, SHA)
    assert not g.downloaded and g.sha256 == SHA and len(log) == n
    # offline: the cache is used, the network never touched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_url(url, raw).sha256 == SHA and len(log) == n


def test_url_checksum_mismatch_keeps_nothing(server, online, tmp_path):
    base, _ = server
    url = f"{base}/repo/abc123/data.jsonl"
    with pytest.raises(SourceError, match=f"sha256 mismatch.*expected {'0' * 64}, got {SHA}"):
        fetch_url(url, tmp_path / "raw", "0" * 64)
    assert not url_cache_path(url, tmp_path / "raw").exists()
    assert not list((tmp_path / "raw").rglob("*.part"))


def test_url_http_error_is_clear(server, online, tmp_path):
    base, _ = server
    with pytest.raises(SourceError, match="download of .*missing.json failed.*404"):
        fetch_url(f"{base}/repo/abc123/missing.json", tmp_path / "raw")


def test_url_offline_without_cache_says_where_to_put_the_file(tmp_path, server, monkeypatch):
    base, log = server
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"{base}/repo/abc123/data.jsonl"
    with pytest.raises(SourceError) as ei:
        fetch_url(url, tmp_path / "raw", SHA)
    msg = str(ei.value)
    assert "HF_HUB_OFFLINE=1" in msg and str(url_cache_path(url, tmp_path / "raw")) in msg
    assert "dataset.source.kind=local" in msg and SHA in msg
    assert log == []  # never touched the server


def test_hf_offline_serves_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rev = "f304ce59671d155273c861746581faa354d8a9af"
    # the layout huggingface_hub's cache uses (what an online download leaves behind)
    snap = tmp_path / "raw" / "hf" / "datasets--org--name" / "snapshots" / rev / "data"
    snap.mkdir(parents=True)
    (snap / "train.jsonl").write_bytes(BODY)
    f = fetch_hf("org/name", "data/train.jsonl", rev, tmp_path / "raw", SHA)
    assert f.sha256 == SHA and f.origin == f"hf://datasets/org/name@{rev}/data/train.jsonl"
    with pytest.raises(SourceError, match="sha256 mismatch"):
        fetch_hf("org/name", "data/train.jsonl", rev, tmp_path / "raw", "1" * 64)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE=1 and hf://datasets/org/other.*not in the cache"):
        fetch_hf("org/other", "data/train.jsonl", rev, tmp_path / "raw")


def test_local_source(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(BODY)
    src = SimpleNamespace(kind="local", path=str(p), sha256=None)
    assert resolve_source(src, tmp_path).sha256 == SHA
    with pytest.raises(SourceError, match="sha256 mismatch"):
        resolve_source(SimpleNamespace(kind="local", path=str(p), sha256="2" * 64), tmp_path)
    with pytest.raises(SourceError, match="file not found"):
        resolve_source(SimpleNamespace(kind="local", path=str(tmp_path / "no.jsonl"), sha256=None), tmp_path)


def test_missing_download_fails_clearly_through_the_cli(tmp_path, capsys):
    """dataset=alpaca_data offline, no cache: exit 1 with where to put the file."""
    from pipeline.data.build import main

    rc = main(["dataset=alpaca_data", f"paths.data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "HF_HUB_OFFLINE=1" in err and str(tmp_path / "raw" / "raw.githubusercontent.com") in err
    assert "alpaca_data.json" in err and "dataset.source.kind=local" in err
    assert not (tmp_path / "processed").exists()

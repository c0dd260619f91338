"""Materialization: URL downloads against a real HTTP server on 127.0.0.1, and corpus bytes by
id."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from faults import bomb_png, strip_png
from PIL import Image

from react_ray.config import (
    CorpusConfig,
    EmbedConfig,
    GenerateConfig,
    MaterializeConfig,
    ModelConfig,
)
from react_ray.formats import ids
from react_ray.formats.embedding_set import read_parquet, write_parquet
from react_ray.jobs.embed import run_embedding
from react_ray.jobs.materialize import run_materialize
from react_ray.retrieve import materialize
from react_ray.synthetic.corpus import generate_corpus


def _jpeg(size=(600, 400)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, "JPEG")
    return buffer.getvalue()


GOOD = _jpeg()
SMALL = _jpeg((300, 200))
STATE = {"broken_fixed": False, "flaky_calls": 0}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes = b"", kind: str = "image/jpeg"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path.startswith("/good"):
            self._send(200, GOOD)
        elif path.startswith("/small/"):  # 300x200, under REACT's 384: left as it is
            self._send(200, SMALL)
        # a redirect into the cloud metadata service: checked like the first URL
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/hostname")
            self.end_headers()
        # a byte every 0.3 s, for ever: only a deadline on the whole fetch ends it
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass
        elif path == "/garbage":  # not HTTP at all
            self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        elif path == "/strip":
            self._send(200, strip_png(), "image/png")
        elif path == "/missing":
            self._send(404, b"not found", "text/plain")
        elif path == "/slow":
            time.sleep(2.5)
            self._send(200, GOOD)
        elif path == "/truncated":
            self._send(200, GOOD[: len(GOOD) // 2])
        elif path == "/text":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif path == "/bomb":
            self._send(200, bomb_png())
        elif path == "/flaky":  # fails twice, then works: retries with backoff must get it
            STATE["flaky_calls"] += 1
            self._send(503) if STATE["flaky_calls"] <= 2 else self._send(200, GOOD)
        elif path == "/broken":  # fails until the test fixes it
            self._send(200, GOOD) if STATE["broken_fixed"] else self._send(503)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


EXPECTED = {
    "/good/1": None,
    "/good/2": None,
    "/missing": "http_error",
    "/slow": "timeout",
    "/truncated": "truncated_image",
    "/text": "corrupt_image",
    "/bomb": "oversize_image",
    "/flaky": None,
    "/broken": "http_error",
    "/to-metadata": "blocked_address",
    "/to-file": "unsupported_scheme",
    "/drip": "timeout",
    "/garbage": "network_error",
    "/strip": "unencodable_image",
    "/a path with spaces/é.jpg": "http_error",
    "file:///etc/hostname": "unsupported_scheme",
}


EXPECTED_REASONS = pd.Series([r for r in EXPECTED.values() if r]).value_counts().to_dict()


def _retrieved(tmp_path, base: str, paths=tuple(EXPECTED)) -> str:
    rows = [
        {
            "id": int(ids.encode(0, i)),
            "key": f"k{i}",
            "url": path if "://" in path else base + path,
            "caption": f"caption {i}",
            "class": "cat" if i % 2 else "dog",
            "label": i % 2,
            "score": 1.0 - i / 100,
        }
        for i, path in enumerate(paths)
    ]
    uri = str(tmp_path / "retrieved.parquet")
    write_parquet(uri, pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False))
    return uri


@pytest.mark.ray
def test_download_counts_every_failure_and_retries_only_failed(ray_local, server, tmp_path):
    config = MaterializeConfig(
        retrieved=_retrieved(tmp_path, server),
        output=str(tmp_path / "train"),
        source="download",
        samples_per_shard=5,
        resize_mode="keep_ratio",
        image_size=64,
        allowed_networks=["127.0.0.1/32"],  # the test server; never the redirect targets
        timeout=1.0,
        deadline=2.0,
        retries=2,
        backoff=0.05,
        threads=4,
    )
    summary = run_materialize(config, progress=False)
    # good x2 + flaky (after retries)
    assert summary.failed == EXPECTED_REASONS and summary.success == 3
    status = pd.concat(
        [
            read_parquet(str(path)).to_pandas()
            for path in sorted((tmp_path / "train").glob("*.status.parquet"))
        ]
    )
    paths = [list(EXPECTED)[row] for row in ids.decode(status["id"].to_numpy())[2]]
    assert dict(zip(paths, status["reason"])) == {
        path: reason or "" for path, reason in EXPECTED.items()
    }
    assert (
        len(status) == len(EXPECTED)
        and (status["message"][status["status"] == "failed"] != "").all()
    )
    with tarfile.open(tmp_path / "train" / "00000.tar") as tar:
        names = sorted(tar.getnames())
        assert "000000000.jpg" in names and "000000000.cls" in names
        image = Image.open(io.BytesIO(tar.extractfile("000000000.jpg").read()))
        # img2dataset's keep_ratio: the 600x400 image's shortest side to 64
        assert image.size == (
            96,
            64,
        )
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert meta["class"] == "dog" and meta["label"] == 0 and meta["url"].endswith("/good/1")

    STATE["broken_fixed"] = True
    again = run_materialize(config.model_copy(update={"retry_failed": True}), progress=False)
    assert again.this_run_fetched == sum(1 for r in EXPECTED.values() if r)  # only the failures
    assert again.success == 4 and again.failed["http_error"] == EXPECTED_REASONS["http_error"] - 1
    rerun = run_materialize(config, progress=False)  # plain rerun: every shard is done
    assert rerun.this_run_shards == 0 and rerun.success == 4


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_shard_is_written_in_parts_and_a_retry_equals_an_uninterrupted_run(
    server, tmp_path, monkeypatch
):
    """Parts of PART_SAMPLES samples (what a task holds in memory) merged in order; a retry keeps
    the members it had, fetches the failed ones, and writes what a run without failures would."""
    paths = ["/good/1", "/broken", "/missing", "/good/2", "/good/4", "/text", "/good/3"]
    retrieved = _retrieved(tmp_path, server, paths)
    config = MaterializeConfig(
        retrieved=retrieved,
        output=str(tmp_path / "train"),
        source="download",
        image_size=64,
        allowed_networks=["127.0.0.1/32"],
        retries=0,
        threads=2,
    )
    monkeypatch.setattr(materialize, "PART_SAMPLES", 2)
    merged = []
    real_merge = materialize.merge_tars
    monkeypatch.setattr(
        materialize, "merge_tars", lambda parts, uri: merged.append(parts) or real_merge(parts, uri)
    )
    rows = materialize.standard_rows(materialize.read_rows(retrieved, 0, len(paths)), 0, config)
    STATE["broken_fixed"] = False
    first = materialize.materialize_shard(0, rows, config)
    assert (first.success, first.failed) == (4, {"http_error": 2, "corrupt_image": 1})
    assert len(merged[-1]) == 4 and not (tmp_path / "train" / "_parts" / "00000").exists()
    STATE["broken_fixed"] = True
    again = materialize.materialize_shard(0, rows, config.model_copy(update={"retry_failed": True}))
    assert (again.success, again.fetched_this_run) == (5, 3)
    fresh = materialize.materialize_shard(
        0, rows, config.model_copy(update={"output": str(tmp_path / "fresh")})
    )
    retried, uninterrupted = (_members(tmp_path / d / "00000.tar") for d in ("train", "fresh"))
    assert list(retried) == list(uninterrupted) and retried == uninterrupted
    assert len(retried) == 4 * fresh.success  # jpg, txt, cls, json each
    assert list(retried) == sorted(retried)  # samples in key order, each one's members together


@pytest.mark.ray
def test_corpus_source_materializes_by_id(ray_local, tmp_path):
    corpus = str(tmp_path / "corpus")
    generate_corpus(
        GenerateConfig(
            output=corpus,
            corpus=CorpusConfig(
                num_shards=2,
                samples_per_shard=20,
                image_size=40,
                eval_samples_per_class=1,
                formats=["webdataset"],
            ),
        ),
        progress=False,
    )
    emb = str(tmp_path / "emb")
    run_embedding(
        EmbedConfig(
            input=f"{corpus}/webdataset",
            output=emb,
            model=ModelConfig(name="react-micro"),
            batch_size=16,
        ),
        progress=False,
    )
    table = read_parquet(f"{emb}/part-000001.parquet").to_pandas().iloc[[3, 7]]
    retrieved = table.assign(**{"class": ["a", "b"], "label": [0, 1], "score": [0.9, 0.8]})
    write_parquet(
        str(tmp_path / "retrieved.parquet"),
        pa.Table.from_pandas(retrieved.drop(columns=["img_emb", "txt_emb"]), preserve_index=False),
    )
    summary = run_materialize(
        MaterializeConfig(
            retrieved=str(tmp_path),
            output=str(tmp_path / "train"),
            embeddings=emb,
            resize_mode="no",
        ),
        progress=False,
    )
    assert summary.success == 2 and summary.failed == {}
    with tarfile.open(tmp_path / "train" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000001.json").read())
        assert (
            meta["source_key"] == retrieved["key"].iloc[1]
            and tar.extractfile("000000001.cls").read() == b"1"
        )
        with tarfile.open(f"{corpus}/webdataset/00001.tar") as source:
            original = Image.open(
                io.BytesIO(source.extractfile(f"{meta['source_key']}.jpg").read())
            )
        copy = Image.open(io.BytesIO(tar.extractfile("000000001.jpg").read()))
        assert copy.size == original.size == (40, 40)
    with pytest.raises(Exception, match="source=corpus needs embeddings"):
        MaterializeConfig(retrieved="x", output="y")


@pytest.mark.ray
@pytest.mark.s3
def test_reacts_retrieved_pairs_file_materializes_and_trains(
    ray_local, server, s3_bucket, tmp_path
):
    """REACT's imagenet_10m.parquet has two columns, URL and TEXT (img2dataset's input): one of that
    shape on the local S3 server, its URLs on the local HTTP server, goes through materialize with
    REACT's img2dataset options, then into a training run."""
    from react_ray.config import TrainConfig
    from react_ray.jobs.train import run_training

    paths = [
        "/good/a",
        "/small/b",
        "/missing",
        "/good/c",
        "/small/d",
        "/text",
        "/good/e",
        "/small/f",
        "/good/g",
    ]
    table = pa.table(
        {
            "URL": [server + p for p in paths],
            "TEXT": [f"a photo number {i}" for i in range(len(paths))],
        }
    )
    write_parquet(f"{s3_bucket}/react/imagenet_10m.parquet", table)
    config = MaterializeConfig(
        retrieved=f"{s3_bucket}/react/imagenet_10m.parquet",
        output=str(tmp_path / "shards"),
        source="download",
        url_col="URL",
        caption_col="TEXT",
        samples_per_shard=4,
        allowed_networks=["127.0.0.1/32"],
        image_size=384,
        resize_only_if_bigger=True,
        resize_mode="keep_ratio",
        skip_reencode=True,
        timeout=2.0,
        retries=0,
    )
    summary = run_materialize(config, progress=False)
    assert summary.success == 7 and summary.failed == {"http_error": 1, "corrupt_image": 1}
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        members = {n: tar.extractfile(n).read() for n in tar.getnames()}
    # no labels
    assert members["000000000.txt"] == b"a photo number 0" and "000000000.cls" not in members
    # shortest side to 384
    assert Image.open(io.BytesIO(members["000000000.jpg"])).size == (
        576,
        384,
    )
    assert members["000000001.jpg"] == SMALL  # smaller than 384: its own bytes (skip_reencode)
    assert json.loads(members["000000001.json"])["id"] == 1  # the row's position in REACT's file
    with pytest.raises(
        ValueError, match=r"has no column 'url' \(columns: URL, TEXT\); set url_col"
    ):
        run_materialize(
            config.model_copy(update={"url_col": "url", "output": str(tmp_path / "x")}),
            progress=False,
        )
    run = run_training(
        TrainConfig(
            data=str(tmp_path / "shards"),
            output=str(tmp_path / "run"),
            model=ModelConfig(name="react-micro"),
            steps=2,
            batch_size=4,
            optim={"lr": 1e-3, "warmup_steps": 1},
            shuffle_buffer=0,
            log_every=1,
            checkpoint_every=2,
            decode={"num_cpus": 0.5},
        )
    )
    assert run.steps == 2 and np.isfinite(run.final_loss)


def test_the_connection_goes_to_the_address_that_was_checked(server, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and to the metadata
    service a moment later. The fetch resolves once and connects to what it checked."""
    import socket

    from react_ray.retrieve import fetch

    port = int(server.rsplit(":", 1)[1])
    answers = iter([("127.0.0.1", port)] + [("169.254.169.254", port)] * 10)
    calls, real = [], socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host != "rebind.test":  # numeric addresses (the connect itself) resolve as usual
            return real(host, *args, **kwargs)
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", next(answers))]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", rebinding)
    policy = fetch.FetchPolicy(
        timeout=2.0, deadline=5.0, retries=0, allowed_networks=("127.0.0.1/32",)
    )
    data, reason, message = fetch.download(f"http://rebind.test:{port}/good/1", policy)
    assert (data, reason) == (GOOD, None) and calls == ["rebind.test"]
    # now the IMDS
    assert fetch.download(f"http://rebind.test:{port}/good/1", policy)[1] == "blocked_address"


def test_corpus_pairs_are_packed_so_that_each_corpus_shard_is_read_once(tmp_path, monkeypatch):
    """Pairs in retrieval order (by class) grouped by the corpus shard their id names: consecutive
    corpus shards share an output shard up to samples_per_shard pairs, a larger one fills several;
    a pack's task reads its corpus shards once for all its output shards."""
    order = [(2, 5), (0, 1), (2, 1), (1, 4), (2, 9)]  # (corpus shard, row), as retrieved
    pairs = pd.DataFrame(
        {
            "id": [int(ids.encode(shard, row)) for shard, row in order],
            "key": [f"{shard}-{row}" for shard, row in order],
            "url": "",
            "caption": "c",
            "class": "a",
            "label": 0,
            "score": 0.5,
        }
    )
    write_parquet(
        str(tmp_path / "retrieved.parquet"), pa.Table.from_pandas(pairs, preserve_index=False)
    )
    config = MaterializeConfig(
        retrieved=str(tmp_path),
        output=str(tmp_path / "train"),
        embeddings="unused",
        resize_mode="no",
        samples_per_shard=2,
    )
    total, shards = materialize.plan_shards(config)
    assert total == 5 and [
        (s["shard"], s["pack"], s["offset"], s["count"], s["corpus_shards"]) for s in shards
    ] == [(0, 0, 0, 2, [0, 1]), (1, 1, 0, 2, [2]), (2, 1, 2, 1, [2])]
    reads = []

    def corpus_bytes(embeddings, id_list):
        reads.append(sorted(ids.decode(list(id_list))[1].tolist()))
        return {int(i): (GOOD, None) for i in id_list}

    monkeypatch.setattr(materialize, "corpus_bytes", corpus_bytes)
    pack = pairs[ids.decode(pairs["id"].to_numpy())[1] == 2].assign(pack=1)
    done = materialize._materialize_pack(pack, config, {1: shards[1:]})
    assert done["shard"].tolist() == [1, 2] and reads == [[2, 2, 2]]  # one read for both shards
    keys = [
        json.loads(member)["source_key"]
        for k in (1, 2)
        for name, member in _members(tmp_path / "train" / f"0000{k}.tar").items()
        if name.endswith(".json")
    ]
    assert keys == ["2-1", "2-5", "2-9"]  # by id across the pack's shards

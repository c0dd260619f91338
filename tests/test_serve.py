"""The Serve apps over real HTTP on 127.0.0.1: results equal library calls, every bad input a
4xx."""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import schemathesis
import torch
from faults import strip_png
from hypothesis import HealthCheck, settings
from PIL import Image
from ports import free_port
from served_corpus import MODEL, build_served_corpus, flat_index

from react_ray.config import (
    IndexConfig,
    ModelConfig,
    RetrievalAppConfig,
    ServeConfig,
    ZeroShotAppConfig,
)
from react_ray.evaluate.zeroshot import zero_shot_classifier
from react_ray.formats.embedding_set import load_embeddings
from react_ray.index.sharded import ShardedIndex
from react_ray.jobs.index import append_to_index, build_index
from react_ray.models import build_model, export_react_checkpoint

pytestmark = pytest.mark.ray
ADMIN_TOKEN, API_TOKEN, FRONT_ORIGIN = (
    "admin-secret-for-tests",
    "api-secret-for-tests",
    "https://front.example",
)


def _jpeg(color=(200, 40, 40), size=(48, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ImageHandler(BaseHTTPRequestHandler):
    """What an image_url may point at: an image, a redirect into the cloud's metadata service,
    a server that drips a byte at a time, one that does not speak HTTP."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            if self.path == "/red.jpg":
                body = _jpeg()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/to-metadata":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/")
                self.end_headers()
            elif self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                while True:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.3)
            else:
                self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        except OSError:  # the client gave up: expected for the drip
            pass


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory, s3_server):
    import boto3
    from ray import serve

    from serve_apps import retrieval
    from serve_apps.run import start_apps

    root = tmp_path_factory.mktemp("serve")
    build_served_corpus(root)
    # A "living" index over the first embedding file only; a test appends the second while serving.
    (root / "emb-living").mkdir()
    for path in [root / "emb" / "_embedding.json", *(root / "emb").glob("part-000000.*")]:
        shutil.copy(path, root / "emb-living" / path.name)
    flat_index(root / "emb-living", root / "index-living")
    # A second "customized" model: the base with one weight changed, stored on S3.
    custom = build_model(MODEL)
    with torch.no_grad():
        custom.model.visual.proj.mul_(-1)
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="models")
    export_react_checkpoint(custom.model, "s3://models/react.pt", custom.spec)
    port = free_port()
    indices = {
        "demo": {"image": str(root / "index-image"), "text": str(root / "index-text")},
        "living": {"image": str(root / "index-living")},
    }
    config = ServeConfig(
        port=port,
        retrieval=RetrievalAppConfig(
            indices=indices,
            model=MODEL,
            shard_groups=2,
            max_k=50,
            max_dedup_hits=100,
            max_request_bytes=200_000,
            image_url_timeout_s=1.0,
            replica={"num_cpus": 0.25},
            reload_interval_s=None,
        ),
        zeroshot=ZeroShotAppConfig(
            models={
                "base": MODEL,
                "react": ModelConfig(name="react-micro", checkpoint="s3://models/react.pt"),
            },
            default_model="base",
            max_images=8,
            max_classes=16,
            replica={"num_cpus": 0.25},
        ),
    )
    images = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    # Tokens come from the environment where an app is built: the public apps get an admin token;
    # the "guarded" one (same indices) an API token, a CORS origin, and 127.0.0.1 for image_url. It
    # takes little CPU: the append test needs free CPUs on this 2-CPU cluster for its index tasks.
    os.environ["REACT_RAY_ADMIN_TOKEN"] = ADMIN_TOKEN
    try:
        urls = start_apps(config)
    finally:
        del os.environ["REACT_RAY_ADMIN_TOKEN"]
    guarded = RetrievalAppConfig(
        indices={"demo": indices["demo"]},
        model=MODEL,
        max_k=50,
        replica={"num_cpus": 0.05},
        image_url_allowed_networks=["127.0.0.1/32"],
        image_url_deadline_s=2.0,
        image_url_timeout_s=1.0,
        reload_interval_s=None,
        access={"cors_origins": [FRONT_ORIGIN]},
    )
    os.environ["REACT_RAY_API_TOKEN"] = API_TOKEN
    try:
        serve.run(
            retrieval.build_app(guarded.model_dump(mode="json")),
            name="guarded",
            route_prefix="/guarded",
        )
    finally:
        del os.environ["REACT_RAY_API_TOKEN"]
    urls["guarded"] = f"http://127.0.0.1:{port}/guarded"
    yield {
        "root": root,
        "urls": urls,
        "index": ShardedIndex(str(root / "index-image")),
        "images": f"http://127.0.0.1:{images.server_address[1]}",
    }
    serve.shutdown()
    images.shutdown()


def _search(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/search", json=body, timeout=60)


def test_text_and_vector_queries_equal_direct_index_search(served):
    url, index = served["urls"]["retrieval"], served["index"]
    clip = build_model(MODEL)
    prompts = ["a photo of a red star", "a blue circle"]
    response = _search(url, queries=[{"text": p} for p in prompts], index="demo", k=7)
    assert response.status_code == 200, response.text
    scores, ids = index.search(clip.encode_texts(prompts).numpy(), 7)
    for row, expected_ids, expected_scores in zip(response.json()["results"], ids, scores):
        assert [h["id"] for h in row] == expected_ids.tolist()
        np.testing.assert_allclose([h["score"] for h in row], expected_scores, atol=1e-4)
        assert all(h["url"].startswith("https://") and h["caption"] is not None for h in row)
    vector = clip.encode_texts(["a green heart"])[0].numpy()
    by_vector = _search(url, queries=[{"vector": (vector * 3).tolist()}], index="demo", k=5).json()[
        "results"
    ][0]
    assert [h["id"] for h in by_vector] == index.search(vector[None], 5)[1][0].tolist()


def test_a_new_index_version_is_swapped_in_under_load_without_errors(served):
    """Append the second embedding file while vector queries keep coming; reload; nothing fails,
    every
    answer is exactly version 1's or version 2's, and after the reload every answer is version
    2's."""
    url, root = served["urls"]["retrieval"], served["root"]
    living = str(root / "index-living")
    queries = load_embeddings(str(root / "emb"))[1][::7][:8].astype(np.float32)
    v1 = ShardedIndex(living).search(queries, 10)[1]
    answers, stop, reloaded_at = [], threading.Event(), []

    def load():
        while not stop.is_set():
            for q, vector in enumerate(queries):
                sent = time.monotonic()
                response = _search(url, queries=[{"vector": vector.tolist()}], index="living", k=10)
                ids = [h["id"] for h in response.json()["results"][0]] if response.ok else None
                answers.append((q, sent, response.status_code, ids))

    def wait_for_answers(count: int, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while len(answers) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) >= count, "the load stopped getting answers"

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for_answers(10)
        # what `react-ray embed` writes for a new input shard
        for path in (root / "emb").glob("part-000001.*"):
            shutil.copy(path, root / "emb-living" / path.name)
        grown = append_to_index(
            IndexConfig(
                embeddings=str(root / "emb-living"),
                output=living,
                append=True,
                tasks={"num_cpus": 0.25},
            ),
            progress=False,
        )
        assert grown.version == 2
        response = requests.post(
            f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert all(versions["living/image"] == 2 for versions in response.json()["versions"])
        reloaded_at.append(time.monotonic())
        wait_for_answers(len(answers) + 16)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    v2 = ShardedIndex(living).search(queries, 10)[1]
    assert not np.array_equal(v1, v2)  # the new half changes the answers
    assert [status for _, _, status, _ in answers] == [200] * len(answers)
    versions = [
        1 if ids == v1[q].tolist() else 2 if ids == v2[q].tolist() else None
        for q, _, _, ids in answers
    ]
    assert None not in versions and 1 in versions
    assert all(v == 2 for v, (_, sent, _, _) in zip(versions, answers) if sent > reloaded_at[0])
    assert (
        requests.get(f"{url}/readyz", timeout=60).json()["versions"]
        == [{"demo/image": 1, "demo/text": 1, "living/image": 2}] * 2
    )


def test_shard_groups_check_for_new_versions_on_their_own(served, tmp_path):
    from serve_apps.retrieval import IndexShardGroup

    emb, output = tmp_path / "emb", str(tmp_path / "index")
    emb.mkdir()
    for path in [
        served["root"] / "emb" / "_embedding.json",
        *(served["root"] / "emb").glob("part-000000.*"),
    ]:
        shutil.copy(path, emb / path.name)
    build_index(
        IndexConfig(
            embeddings=str(emb),
            output=output,
            factory="IDMap,Flat",
            tune_queries=5,
            tasks={"num_cpus": 0.25},
        ),
        progress=False,
    )
    group = IndexShardGroup.func_or_class(
        {"x": {"image": output}},
        0,
        1,
        batching=True,
        max_batch_size=8,
        batch_wait_timeout_s=0.001,
        reload_interval_s=0.5,
    )
    assert group._versions() == {"x/image": 1}
    for path in (served["root"] / "emb").glob("part-000001.*"):
        shutil.copy(path, emb / path.name)
    append_to_index(
        IndexConfig(embeddings=str(emb), output=output, append=True, tasks={"num_cpus": 0.25}),
        progress=False,
    )
    deadline = time.monotonic() + 30
    while (check := group._reload_if_due()) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # not due yet: the interval runs from construction
    check.join(timeout=60)
    # and checked just now: no second check is due
    assert group._versions() == {"x/image": 2} and group._reload_if_due() is None


def test_concurrent_requests_with_different_k_are_never_mixed(served):
    url, index = served["urls"]["retrieval"], served["index"]
    clip = build_model(MODEL)
    texts = [
        f"a photo of a {c} square" for c in ("red", "green", "blue", "yellow", "black", "white")
    ] * 3

    def one(i):
        return _search(url, queries=[{"text": texts[i]}], index="demo", k=1 + i).json()["results"][
            0
        ]

    with ThreadPoolExecutor(18) as pool:
        results = list(pool.map(one, range(18)))
    for i, row in enumerate(results):
        expected = index.search(clip.encode_texts([texts[i]]).numpy(), 1 + i)[1][0].tolist()
        assert [h["id"] for h in row] == expected


def test_deduplicate_drops_hits_whose_vectors_nearly_repeat_a_better_one(served):
    url, root = served["urls"]["retrieval"], served["root"]
    all_ids, vectors = load_embeddings(str(root / "emb"))
    unit = vectors.astype(np.float32) / np.linalg.norm(
        vectors.astype(np.float32), axis=1, keepdims=True
    )
    by_id = dict(zip(all_ids.tolist(), unit))
    query, k = [{"text": "a photo of a red star"}], 6
    plain = _search(url, queries=query, index="demo", k=3 * k).json()["results"][0]
    kept = []  # best first: a hit stays unless a kept one is within the threshold (0.95)
    for hit in plain:
        if all(by_id[hit["id"]] @ by_id[j] < 0.95 for j in kept):
            kept.append(hit["id"])
    deduplicated = _search(url, queries=query, index="demo", k=k, deduplicate=True).json()[
        "results"
    ][0]
    assert [h["id"] for h in deduplicated] == kept[:k]
    assert len(kept) < len(plain), (
        "the corpus should hold near-duplicates for this test to mean something"
    )
    chosen = np.stack([by_id[h["id"]] for h in deduplicated])
    assert (np.triu(chosen @ chosen.T, 1) < 0.95).all()


def test_image_query_and_laion_knn_api(served):
    url, index = served["urls"]["retrieval"], served["index"]
    clip = build_model(MODEL)
    image = _jpeg()
    ours = _search(url, queries=[{"image": _b64(image)}], index="demo", k=4).json()["results"][0]
    expected = index.search(
        clip.encode_images(clip.preprocess(Image.open(io.BytesIO(image)))[None]).numpy(), 4
    )
    assert [h["id"] for h in ours] == expected[1][0].tolist()
    assert requests.get(f"{url}/indices-list", timeout=30).json() == ["demo", "living"]
    knn = requests.post(
        f"{url}/knn-service",
        json={
            "text": "a red star",
            "modality": "text",
            "num_images": 3,
            "indice_name": "demo",
            "deduplicate": True,
            "use_safety_model": True,
        },
        timeout=30,
    )
    assert knn.status_code == 200, knn.text
    hits = knn.json()
    assert len(hits) == 3 and {"id", "similarity", "url", "caption"} <= set(hits[0])
    meta = requests.post(
        f"{url}/metadata", json={"indice_name": "demo", "ids": [hits[0]["id"]]}, timeout=30
    ).json()
    assert meta[0]["metadata"]["url"] == hits[0]["url"] and 0 <= meta[0]["metadata"]["punsafe"] <= 1
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{url}/readyz", timeout=30).json()["shard_groups"] == 2
    assert "/v1/search" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    # 81 Mpixel > the 40 Mpixel limit, tiny file
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"queries": [{"image": "not base64!!"}], "index": "demo"},
            400,
            "queries[0].image: invalid base64",
        ),
        (
            {"queries": [{"image": _b64(b"plain text")}], "index": "demo"},
            400,
            "queries[0].image: corrupt_image",
        ),
        (
            {"queries": [{"image": _b64(_jpeg()[:200])}], "index": "demo"},
            400,
            "queries[0].image: truncated_image",
        ),
        ({"queries": [{"image": _b64(_bomb())}], "index": "demo"}, 400, "oversize_image"),
        ({"queries": [{"text": "x"}], "index": "demo", "k": 0}, 422, "greater than or equal to 1"),
        ({"queries": [{"text": "x"}], "index": "demo", "k": 51}, 422, "k: got 51; the limit is 50"),
        (
            {"queries": [{"vector": [0.1, 0.2]}], "index": "demo"},
            422,
            "got 2 dimensions; the index holds 32-d",
        ),
        ({"queries": [{"text": "x"}], "index": "nope"}, 404, "unknown index 'nope'"),
        (
            {"queries": [{"text": "x", "vector": [1.0]}], "index": "demo"},
            422,
            "give exactly one of",
        ),
        ({"index": "demo"}, 422, "queries"),
        (
            {"queries": [{"image_url": "http://127.0.0.1:9/x.jpg"}], "index": "demo"},
            400,
            "could not fetch the image (blocked_address)",
        ),
        (
            {"queries": [{"image_url": "file:///etc/hostname"}], "index": "demo"},
            400,
            "(unsupported_scheme)",
        ),
        (
            {
                "queries": [{"image_url": "http://169.254.169.254/latest/meta-data/"}],
                "index": "demo",
            },
            400,
            "(blocked_address)",
        ),
        # 1 x 100,000 px
        (
            {"queries": [{"image": _b64(strip_png())}], "index": "demo"},
            400,
            "oversize_image",
        ),
        (
            {"queries": [{"text": "x" * 1001}], "index": "demo"},
            422,
            "queries[0].text: 1,001 characters",
        ),
        (
            {"queries": [{"text": "x"}] * 3, "index": "demo", "k": 50, "deduplicate": True},
            422,
            "candidates x queries = 450; the limit is 100",
        ),
    ],
)
def test_bad_search_requests_get_precise_4xx(served, body, status, message):
    response = _search(served["urls"]["retrieval"], **body)
    assert response.status_code == status, response.text
    assert message in response.text


def test_malformed_and_oversized_bodies_then_still_serving(served):
    url = served["urls"]["retrieval"]
    bad_json = requests.post(
        f"{url}/v1/search",
        data="{not json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert bad_json.status_code == 422 and "JSON" in bad_json.text
    huge = requests.post(
        f"{url}/v1/search", json={"queries": [{"text": "x" * 300_000}], "index": "demo"}, timeout=30
    )
    assert huge.status_code == 413 and "the limit is 200,000" in huge.text
    missing = requests.post(
        f"{url}/knn-service", json={"text": "a star", "indice_name": "demo"}, timeout=30
    )
    assert missing.status_code == 422 and "modality: required field is missing" in missing.text
    assert _search(url, queries=[{"text": "a red star"}], index="demo", k=3).status_code == 200


def test_image_urls_are_fetched_only_where_allowed_and_within_a_deadline(served):
    """The guarded app may fetch from 127.0.0.1 (its config says so): the image works, but a
    redirect into the metadata service, a drip-feeding server and a non-HTTP server are each a
    400 naming the reason, never an OS error text; the drip ends at the deadline."""
    url, images = served["urls"]["guarded"], served["images"]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    def query(image_url: str) -> requests.Response:
        return requests.post(
            f"{url}/v1/search",
            json={"queries": [{"image_url": image_url}], "index": "demo", "k": 3},
            headers=auth,
            timeout=60,
        )

    fetched = query(f"{images}/red.jpg")
    assert fetched.status_code == 200, fetched.text
    direct = requests.post(
        f"{url}/v1/search",
        json={"queries": [{"image": _b64(_jpeg())}], "index": "demo", "k": 3},
        headers=auth,
        timeout=60,
    )
    assert [h["id"] for h in fetched.json()["results"][0]] == [
        h["id"] for h in direct.json()["results"][0]
    ]
    for path, reason in (("/to-metadata", "blocked_address"), ("/not-http", "network_error")):
        refused = query(f"{images}{path}")
        assert (
            refused.status_code == 400 and f"could not fetch the image ({reason})" in refused.text
        )
    start = time.monotonic()
    dripped = query(f"{images}/drip")
    assert dripped.status_code == 400 and "(timeout)" in dripped.text
    # the app's image_url_deadline_s, plus slack for the request
    assert time.monotonic() - start < 2.0 + 3
    # The public app (no allowed networks) never reaches 127.0.0.1 at all.
    public = _search(
        served["urls"]["retrieval"], queries=[{"image_url": f"{images}/red.jpg"}], index="demo"
    )
    assert public.status_code == 400 and "(blocked_address)" in public.text


@pytest.mark.parametrize(
    "path, raw, status, message",
    [
        ("/knn-service", b'{"text": "a', 400, "not valid JSON"),
        (
            "/knn-service",
            b'{"text": "x", "modality": "image", "indice_name": "demo", "num_images": 1e400}',
            422,
            "num_images: expected a positive integer",
        ),
        (
            "/knn-service",
            b'{"text": "x", "modality": "image", "indice_name": "demo", "num_images": true}',
            422,
            "num_images: expected a positive integer",
        ),
        (
            "/knn-service",
            b'{"text": "x", "modality": "image", "indice_name": "demo", "num_images": 3, '
            b'"deduplicate": "false"}',
            422,
            "deduplicate: expected true or false",
        ),
        ("/knn-service", b"[1, 2]", 422, "expected a JSON object"),
        *(
            (
                "/knn-service",
                b'{"text": "x", "modality": "image", "indice_name": "demo", "num_images": 3, '
                + extra
                + b"}",
                422,
                message,
            )
            for extra, message in (
                (b'"use_mclip": true', "use_mclip: this server has no multilingual text encoder"),
                (b'"use_safety_model": "yes"', "use_safety_model: expected true or false"),
                (b'"num_result_ids": 51', "num_result_ids: got 51; the limit is 50"),
                (b'"aesthetic_score": "abc", "aesthetic_weight": 1', "aesthetic_score: expected"),
                (b'"aesthetic_score": 3.5, "aesthetic_weight": 1', "expected an integer"),
                (b'"aesthetic_score": 10, "aesthetic_weight": 1', "less than or equal to 9"),
                (b'"aesthetic_score": 3', "aesthetic_weight: required with aesthetic_score"),
                (
                    b'"aesthetic_score": "3", "aesthetic_weight": "0.5"',
                    "aesthetic_score: this server has no aesthetic embeddings",
                ),
            )
        ),
        ("/metadata", b'{"indice_name": "demo", "ids": [18446744073709551616]}', 422, "ids"),
        ("/metadata", b'{"indice_name": "demo", "ids": [-1]}', 422, "ids"),
        ("/v1/search", b'{"queries": [{"text": "x"}], "index": "demo", "k": 1e400}', 422, "k"),
    ],
)
def test_hostile_json_gets_a_4xx_not_a_500(served, path, raw, status, message):
    response = requests.post(
        f"{served['urls']['retrieval']}{path}",
        data=raw,
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert message in response.text


def test_a_streamed_body_over_the_limit_is_refused(served):
    """No Content-Length (chunked transfer): the body is counted as it arrives."""
    url = served["urls"]["retrieval"]

    def chunks():
        yield b'{"queries": [{"text": "'
        for _ in range(300):
            yield b"x" * 1000
        yield b'"}], "index": "demo"}'

    response = requests.post(
        f"{url}/v1/search", data=chunks(), timeout=30, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and "over the limit of 200,000 bytes" in response.text
    assert _search(url, queries=[{"text": "a red star"}], index="demo", k=3).status_code == 200


def test_tokens_and_origins(served):
    """Admin routes need the admin token (and are off where none is configured); the guarded app's
    query routes need its API token; a browser on another site is refused unless allowed by CORS."""
    public, guarded = served["urls"]["retrieval"], served["urls"]["guarded"]
    reload = f"{public}/admin/reload"
    assert requests.post(reload, timeout=30).status_code == 401
    assert (
        requests.post(reload, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code
        == 401
    )
    assert (
        requests.post(
            reload, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
        ).status_code
        == 200
    )
    off = requests.post(
        f"{guarded}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    )
    assert off.status_code == 403 and "admin routes are off" in off.text

    body = {"queries": [{"text": "a red star"}], "index": "demo", "k": 2}
    assert requests.post(f"{guarded}/v1/search", json=body, timeout=30).status_code == 401
    knn = {"text": "a red star", "modality": "image", "indice_name": "demo", "num_images": 2}
    assert requests.post(f"{guarded}/knn-service", json=knn, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    assert (
        requests.post(f"{guarded}/v1/search", json=body, headers=auth, timeout=30).status_code
        == 200
    )
    assert requests.get(f"{guarded}/healthz", timeout=30).status_code == 200  # probes stay open

    # A page on another site posting a "simple" (text/plain) request: refused before it runs.
    evil = requests.post(
        f"{public}/knn-service",
        data='{"text": "x", "modality": "image", "indice_name": "demo", "num_images": 1}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        timeout=30,
    )
    assert evil.status_code == 403 and "origin https://evil.example is not allowed" in evil.text
    preflight = requests.options(
        f"{guarded}/v1/search",
        timeout=30,
        headers={
            "Origin": FRONT_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert (
        preflight.status_code == 204
        and preflight.headers["access-control-allow-origin"] == FRONT_ORIGIN
    )
    allowed = requests.post(
        f"{guarded}/v1/search", json=body, headers=auth | {"Origin": FRONT_ORIGIN}, timeout=30
    )
    assert (
        allowed.status_code == 200
        and allowed.headers["access-control-allow-origin"] == FRONT_ORIGIN
    )
    assert (
        requests.options(
            f"{guarded}/v1/search", headers={"Origin": "https://evil.example"}, timeout=30
        ).status_code
        == 403
    )


def test_zero_shot_multiplexed_models_match_direct_calls(served):
    url = served["urls"]["zeroshot"]
    classes, templates = ["red", "blue", "green"], ["a {} square.", "a photo of something {}."]
    image = _jpeg((30, 40, 210))
    body = {
        "images": [_b64(image), _b64(_jpeg())],
        "classnames": classes,
        "templates": templates,
        "top_k": 2,
    }
    by_field = requests.post(f"{url}/v1/classify", json=body | {"model": "react"}, timeout=120)
    by_header = requests.post(
        f"{url}/v1/classify",
        json=body,
        headers={"serve_multiplexed_model_id": "react"},
        timeout=120,
    )
    default = requests.post(f"{url}/v1/classify", json=body, timeout=120)
    assert by_field.status_code == 200, by_field.text
    assert by_field.json() == by_header.json() and by_field.json()["model"] == "react"
    assert default.json()["model"] == "base" and default.json() != by_field.json()
    # as served: fp16 file
    react = build_model(ModelConfig(name="react-micro", checkpoint="s3://models/react.pt"))
    for name, clip in (("react", react), ("base", build_model(MODEL))):
        weights = zero_shot_classifier(clip, classes, templates)
        logits = (
            clip.encode_images(clip.preprocess(Image.open(io.BytesIO(image)))[None]) @ weights.T
        )
        probs = torch.softmax(float(clip.model.logit_scale.detach().exp()) * logits, 1)[0].numpy()
        got = (by_field if name == "react" else default).json()["predictions"][0]
        assert got["labels"] == [classes[i] for i in np.argsort(-probs)[:2]]
        np.testing.assert_allclose(got["scores"], np.sort(probs)[::-1][:2], atol=1e-4)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"images": ["AAAA"], "classnames": ["a"], "model": "nope"}, 404, "unknown model 'nope'"),
        ({"images": [_b64(b"junk")], "classnames": ["a", "b"]}, 400, "images[0]: corrupt_image"),
        (
            {"images": [_b64(_jpeg())], "classnames": ["a"], "templates": ["no slot"]},
            422,
            "exactly one '{}'",
        ),
        ({"images": [_b64(_jpeg())]}, 422, "give exactly one of classnames or task"),
        ({"images": [_b64(_jpeg())], "task": "imagenet"}, 404, "unknown task 'imagenet'"),
        ({"images": [_b64(_jpeg())] * 9, "classnames": ["a"]}, 413, "9 images; the limit is 8"),
        (
            {"images": [_b64(_jpeg())], "classnames": [str(i) for i in range(17)]},
            413,
            "17 classes; the limit is 16",
        ),
        ({"images": [], "classnames": ["a"]}, 422, "images"),
        # A format spec would build a 1 GB string per prompt; attribute access would read objects.
        (
            {"images": [_b64(_jpeg())], "classnames": ["a"], "templates": ["{{}}{:>1000000000}"]},
            422,
            "no other braces",
        ),
        (
            {"images": [_b64(_jpeg())], "classnames": ["a"], "templates": ["{0.__class__} {}"]},
            422,
            "no other braces",
        ),
        (
            {"images": [_b64(_jpeg())], "classnames": ["a"], "templates": ["{} and {}"]},
            422,
            "no other braces",
        ),
        (
            {"images": [_b64(_jpeg())], "classnames": ["a"], "templates": ["a {}."] * 101},
            413,
            "101 templates; the limit is 100",
        ),
        (
            {"images": [_b64(_jpeg())], "classnames": ["a" * 301]},
            422,
            "classnames[0]: 301 characters",
        ),
        (
            {"images": [_b64(strip_png())], "classnames": ["a", "b"]},
            400,
            "images[0]: oversize_image",
        ),
    ],
)
def test_bad_classify_requests_get_precise_4xx(served, body, status, message):
    response = requests.post(f"{served['urls']['zeroshot']}/v1/classify", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.text


def test_search_page_in_headless_chromium(served):
    import shutil

    from playwright import sync_api as playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "Debian's chromium package is required (apt-get install chromium)"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served["urls"]["retrieval"] + "/")
        page.wait_for_selector("#index option", state="attached")
        page.fill("#text", "a photo of a red star")
        page.fill("#k", "6")
        page.click("#go")
        page.wait_for_selector("figure.hit")
        assert page.locator("figure.hit").count() == 6
        assert "score" in page.locator("figure.hit").first.inner_text()
        assert "6 results" in page.inner_text("#status")
        # allowed by the form, refused by the server (max_k 50): shown as an error
        page.fill("#k", "51")
        page.click("#go")
        page.wait_for_selector("#status.error")
        assert "k: got 51; the limit is 50" in page.inner_text("#status")
        browser.close()


# ---------------------------------------------------------------- API fuzzing (schemathesis)
FUZZ = {
    "max_examples": 400,
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "database": None,
}
FUZZED: Counter = Counter()


@pytest.fixture(scope="module")
def retrieval_openapi(served):
    return schemathesis.openapi.from_url(f"{served['urls']['retrieval']}/openapi.json")


@pytest.fixture(scope="module")
def zeroshot_openapi(served):
    schema = schemathesis.openapi.from_url(f"{served['urls']['zeroshot']}/openapi.json")
    # its paths are relative to the app's route prefix
    schema.config.base_url = served["urls"]["zeroshot"]
    return schema


retrieval_api = schemathesis.pytest.from_fixture("retrieval_openapi")
zeroshot_api = schemathesis.pytest.from_fixture("zeroshot_openapi")


def _no_server_error(app: str, case) -> None:
    response = case.call(timeout=60)
    FUZZED[f"{app} {case.operation.label}"] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.path} {case.body!r:.300} "
        f"-> {response.status_code}: {response.text[:300]}"
    )


@retrieval_api.parametrize()
@settings(**FUZZ)
def test_fuzzed_retrieval_requests_never_get_a_5xx(case):
    _no_server_error("retrieval", case)


@zeroshot_api.parametrize()
@settings(**FUZZ)
def test_fuzzed_zeroshot_requests_never_get_a_5xx(case):
    _no_server_error("zeroshot", case)


def test_both_apps_are_healthy_after_the_fuzzing(served):
    print(f"\nfuzzed requests: {sum(FUZZED.values())} ({dict(FUZZED)})")
    assert sum(FUZZED.values()) >= 2000  # hypothesis stops early only on routes with little to vary
    for name in ("retrieval", "zeroshot"):
        assert requests.get(f"{served['urls'][name]}/readyz", timeout=60).status_code == 200
    assert (
        _search(
            served["urls"]["retrieval"], queries=[{"text": "a red star"}], index="demo", k=3
        ).status_code
        == 200
    )

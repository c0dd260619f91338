"""clip-retrieval's own clients, unchanged, against the retrieval app over real HTTP: its
``ClipClient`` with its defaults and with every option, and its clip-front page in headless
Chromium from another origin. Each answer is compared with a search done here by hand (numpy
over the stored vectors, the corpus's own metadata), so every option is shown honoured, or
refused with a reason, never merely accepted."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import shutil
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ports import free_port
from served_corpus import MODEL, build_served_corpus, flat_index

from react_ray.config import RetrievalAppConfig, SafetyConfig
from react_ray.models import build_model
from react_ray.synthetic.embeddings import write_clustered_embedding_set

pytestmark = pytest.mark.ray
QUERY = "a photo of a red star"
UNSAFE_THRESHOLD = 0.05  # the corpus's punsafe ~ Beta(0.5, 12): about a fifth are above it
NEAR_DUPLICATE = RetrievalAppConfig.model_fields["near_duplicate_threshold"].default


def clip_retrieval_dir() -> Path:
    spec = importlib.util.find_spec("clip_retrieval")
    assert spec, "./run setup installs clip-retrieval (pip install --no-deps clip-retrieval)"
    return Path(spec.submodule_search_locations[0])


def clip_client_module():
    """clip_retrieval/clip_client.py as published, loaded without the package's __init__ (which
    imports its server and that server's pinned torch, faiss and numpy<2)."""
    spec = importlib.util.spec_from_file_location(
        "clip_client", clip_retrieval_dir() / "clip_client.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclass
class Corpus:
    """The served corpus as stored: unit vectors per modality, and each id's metadata."""

    ids: np.ndarray
    vectors: dict[str, np.ndarray]
    meta: dict[int, dict]

    @classmethod
    def read(cls, embeddings: Path) -> Corpus:
        table = pq.read_table(sorted(embeddings.glob("*.parquet")))
        vectors = {
            modality: unit(
                np.stack(table[column].to_numpy(zero_copy_only=False)).astype(np.float32)
            )
            for modality, column in (("image", "img_emb"), ("text", "txt_emb"))
        }
        meta = {
            i: {"url": u, "caption": c, **json.loads(m or "{}")}
            for i, u, c, m in zip(*(table[n].to_pylist() for n in ("id", "url", "caption", "meta")))
        }
        return cls(table["id"].to_numpy(), vectors, meta)

    def expected(
        self,
        query: np.ndarray,
        modality: str = "image",
        num_images: int = 40,
        num_result_ids: int | None = None,
        deduplicate: bool = True,
        safe: bool = True,
        violence: np.ndarray | None = None,
        aesthetic: np.ndarray | None = None,
        aesthetic_weight: float = 0.0,
        unsafe_threshold: float = UNSAFE_THRESHOLD,
    ) -> tuple[list[int], dict[str, int]]:
        """clip back's semantics: search num_result_ids, drop what the filters flag, return the
        first num_images. -> (ids, how many each filter dropped)."""
        vectors = self.vectors[modality]
        if aesthetic is not None:
            query = unit(query + aesthetic_weight * aesthetic)
        order = np.argsort(-(vectors @ query), kind="stable")[: num_result_ids or num_images]
        dropped = {"violence": 0, "unsafe": 0, "duplicate": 0}
        passed = []
        for row in order:
            if violence is not None and np.argmax(unit(violence) @ vectors[row]) == 1:
                dropped["violence"] += 1
            elif safe and self.meta[int(self.ids[row])]["punsafe"] > unsafe_threshold:
                dropped["unsafe"] += 1
            else:
                passed.append(row)
        if deduplicate:  # a hit stays unless a better kept one is near; then repeated URLs go
            kept = []
            for row in passed:
                if all(vectors[row] @ vectors[k] < NEAR_DUPLICATE for k in kept):
                    kept.append(row)
            urls = [self.meta[int(self.ids[r])]["url"] for r in kept]
            kept = [r for n, r in enumerate(kept) if urls[n] not in urls[:n]]
            dropped["duplicate"] = len(passed) - len(kept)
            passed = kept
        return [int(self.ids[r]) for r in passed[:num_images]], dropped


def _static_server(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(Quiet, directory=str(directory))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def clients(ray_local, tmp_path_factory):
    from ray import serve

    from serve_apps import retrieval

    root = tmp_path_factory.mktemp("clip-clients")
    indices = build_served_corpus(root)
    corpus = Corpus.read(root / "emb")
    clip = build_model(MODEL)
    query = clip.encode_texts([QUERY]).numpy()[0]

    # Stand-ins with the shapes of LAION's files: aesthetic rating0..9.npy, (1, dim) each, and
    # the violence detector's (2, dim) prompts: here "violent" means nearer the query's
    # third-best image than its best, so the filter bites on these results.
    rng = np.random.default_rng(0)
    ratings = unit(rng.normal(size=(10, query.size))).astype(np.float32)
    nearest = np.argsort(-(corpus.vectors["image"] @ query))
    ratings[9] = corpus.vectors["image"][nearest[-1]]  # far from the query: steering shows
    (root / "aesthetic").mkdir()
    for score, rating in enumerate(ratings):
        np.save(root / "aesthetic" / f"rating{score}.npy", rating[None])
    violence = corpus.vectors["image"][nearest[[0, 2]]].astype(np.float32)
    np.save(root / "violence.npy", violence)

    # An index whose metadata has no safety column (url and caption only).
    write_clustered_embedding_set(
        str(root / "bare-emb"), num_files=1, rows_per_file=200, dim=query.size, model=MODEL.name
    )
    flat_index(root / "bare-emb", root / "bare-index")

    front_dir = root / "front"
    shutil.copytree(clip_retrieval_dir().parent / "front" / "build", front_dir)
    (front_dir / "red.jpg").write_bytes(_jpeg())
    front, front_url = _static_server(front_dir)
    other, other_url = _static_server(front_dir)  # an origin the app does not allow

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    compat = RetrievalAppConfig(
        indices={"demo": indices},
        model=MODEL,
        colocate=True,
        aesthetic_embeddings=str(root / "aesthetic"),
        safety=SafetyConfig(
            unsafe_threshold=UNSAFE_THRESHOLD, violence_prompts=str(root / "violence.npy")
        ),
        image_url_allowed_networks=["127.0.0.1/32"],
        access={"cors_origins": [front_url]},
        replica={"num_cpus": 0.05},
        reload_interval_s=None,
    )
    plain = RetrievalAppConfig(
        indices={"demo": {"image": indices["image"]}, "bare": {"image": str(root / "bare-index")}},
        model=MODEL,
        replica={"num_cpus": 0.05},
        reload_interval_s=None,
    )
    for name, config in (("compat", compat), ("plain", plain)):
        serve.run(
            retrieval.build_app(config.model_dump(mode="json")),
            name=name,
            route_prefix=f"/{name}",
        )
    (front_dir / "config.json").write_text(
        json.dumps({"defaultBackend": f"{base}/compat", "defaultIndex": "demo"})
    )
    yield {
        "compat": f"{base}/compat",
        "plain": f"{base}/plain",
        "front": front_url,
        "other_origin": other_url,
        "corpus": corpus,
        "clip": clip,
        "query": query,
        "ratings": ratings,
        "violence": violence,
        "root": root,
    }
    serve.shutdown()
    front.shutdown()
    other.shutdown()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_clip_client_defaults_are_all_honoured(clients):
    """ClipClient's defaults: 40 images, deduplicate, safety model, violence detector, aesthetic
    score 9 at weight 0.5: each one changes the answer, exactly as clip back defines it."""
    module = clip_client_module()
    client = module.ClipClient(url=f"{clients['compat']}/knn-service", indice_name="demo")
    hits = client.query(text=QUERY)
    expected, dropped = clients["corpus"].expected(
        clients["query"],
        violence=clients["violence"],
        aesthetic=clients["ratings"][9],
        aesthetic_weight=0.5,
    )
    assert all(dropped.values()), f"every filter should bite here: {dropped}"
    assert [h["id"] for h in hits] == expected
    corpus = clients["corpus"]
    for hit in hits:
        meta = corpus.meta[hit["id"]]
        assert (hit["url"], hit["caption"], hit["punsafe"]) == (
            meta["url"],
            meta["caption"],
            meta["punsafe"],
        )
        assert hit["punsafe"] <= UNSAFE_THRESHOLD and -1 <= hit["similarity"] <= 1
    unsteered, _ = corpus.expected(clients["query"], violence=clients["violence"])
    assert unsteered != expected, "the aesthetic steering should change the ranking"


OPTIONS = {
    "text index": ({"modality": "TEXT"}, "text"),
    "image file": ({}, "image file"),
    "image url": ({}, "image url"),
    "embedding input": ({}, "embedding"),
    "7 images, nothing filtered": (
        {
            "num_images": 7,
            "deduplicate": False,
            "use_safety_model": False,
            "use_violence_detector": False,
            "aesthetic_weight": 0.0,
        },
        "text",
    ),
    "aesthetic score 2 at weight 1.5": ({"aesthetic_score": 2, "aesthetic_weight": 1.5}, "text"),
    "only the safety model": (
        {"deduplicate": False, "use_violence_detector": False, "aesthetic_weight": 0.0},
        "text",
    ),
}


@pytest.mark.parametrize("options, query_kind", OPTIONS.values(), ids=OPTIONS.keys())
def test_clip_client_options_change_the_answer_as_clip_back_defines_them(
    clients, options, query_kind
):
    module = clip_client_module()
    kwargs = dict(options)
    if "modality" in kwargs:
        kwargs["modality"] = getattr(module.Modality, kwargs["modality"])
    client = module.ClipClient(url=f"{clients['compat']}/knn-service", indice_name="demo", **kwargs)
    clip, root = clients["clip"], clients["root"]
    query = clients["query"]
    if query_kind == "text":
        hits = client.query(text=QUERY)
    elif query_kind == "embedding":
        query = unit(clients["corpus"].vectors["image"][5])
        hits = client.query(embedding_input=query.tolist())
    else:
        query = clip.encode_images(clip.preprocess(Image.open(io.BytesIO(_jpeg())))[None])
        query = query.numpy()[0]
        if query_kind == "image file":
            hits = client.query(image=str(root / "front" / "red.jpg"))
        else:
            hits = client.query(image=f"{clients['front']}/red.jpg")
    assert isinstance(hits, list), hits
    expected, _ = clients["corpus"].expected(
        query,
        modality=client.modality,
        num_images=client.num_images,
        deduplicate=client.deduplicate,
        safe=client.use_safety_model,
        violence=clients["violence"] if client.use_violence_detector else None,
        aesthetic=clients["ratings"][client.aesthetic_score],
        aesthetic_weight=client.aesthetic_weight,
    )
    assert [h["id"] for h in hits] == expected


def test_what_a_server_cannot_honour_is_refused_with_the_reason(clients):
    module = clip_client_module()
    url = f"{clients['plain']}/knn-service"
    # No aesthetic embeddings configured: the default score 9 at weight 0.5 is refused, not dropped.
    refused = module.ClipClient(url=url, indice_name="demo").query(text=QUERY)
    assert "aesthetic_score: this server has no aesthetic embeddings" in refused["detail"]
    refused = module.ClipClient(url=url, indice_name="demo", use_mclip=True).query(text=QUERY)
    assert "use_mclip: this server has no multilingual text encoder" in refused["detail"]
    refused = module.ClipClient(url=url, indice_name="bare", aesthetic_weight=0).query(text=QUERY)
    assert "the index 'bare' has no safety column (punsafe or NSFW)" in refused["detail"]
    # Without a prompts file, the violence detector's prompts come from the app's text tower.
    hits = module.ClipClient(url=url, indice_name="demo", aesthetic_weight=0).query(text=QUERY)
    violence = clients["clip"].encode_texts(SafetyConfig().violence_texts).numpy()
    expected, _ = clients["corpus"].expected(
        clients["query"], violence=violence, unsafe_threshold=SafetyConfig().unsafe_threshold
    )
    assert [h["id"] for h in hits] == expected
    hits = module.ClipClient(
        url=url,
        indice_name="bare",
        num_images=5,
        aesthetic_weight=0,
        use_safety_model=False,
        use_violence_detector=False,
        deduplicate=False,
    ).query(text=QUERY)
    assert len(hits) == 5 and all(h["url"].startswith("http://img/") for h in hits)


def test_clip_front_from_another_origin_in_headless_chromium(clients):
    """clip-front's build, served from its own origin, searches the app as a browser does: a
    text/plain POST that needs the CORS header; a JSON POST (preflighted) from the same page; and
    an origin the app does not allow gets a 403 the browser cannot read."""
    from playwright import sync_api as playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "Debian's chromium package is required (apt-get install chromium)"
    compat, front = clients["compat"], clients["front"]
    search = f"?back={compat}&index=demo&query={QUERY.replace(' ', '%20')}"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        with page.expect_response(lambda r: r.url.endswith("/knn-service")) as answer:
            page.goto(f"{front}/{search}")
        response = answer.value
        assert response.status == 200 and response.headers["access-control-allow-origin"] == front
        sent = json.loads(response.request.post_data)
        assert (sent["num_images"], sent["num_result_ids"], sent["use_safety_model"]) == (
            40,
            3000,
            True,
        )
        expected, _ = clients["corpus"].expected(
            clients["query"],
            num_result_ids=sent["num_result_ids"],
            deduplicate=sent["deduplicate"],
            violence=clients["violence"] if sent["use_violence_detector"] else None,
        )
        assert [h["id"] for h in response.json()] == expected
        first_caption = clients["corpus"].meta[expected[0]]["caption"]
        page.wait_for_function(
            "text => document.querySelector('clip-front').shadowRoot.innerHTML.includes(text)",
            arg=first_caption,
        )
        preflighted = page.evaluate(
            """async url => {
                const r = await fetch(url + "/knn-service", {method: "POST",
                    headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({text: "a blue ring", modality: "image",
                                          num_images: 5, indice_name: "demo"})});
                return [r.status, (await r.json()).length];
            }""",
            compat,
        )
        assert preflighted == [200, 5]
        # Elsewhere, every call is refused (403, no CORS header), so the browser shows the page
        # nothing: neither the index list nor the search it still tries.
        failed, answered, console = [], [], []
        page.on("requestfailed", lambda r: failed.append(r.url.rsplit("/", 1)[-1]))
        page.on("response", lambda r: answered.append(r.url.rsplit("/", 1)[-1]))
        page.on("console", lambda m: console.append(m.text))
        page.goto(f"{clients['other_origin']}/{search}")
        # The two calls run concurrently and fail in either order: wait for each (events are only
        # delivered inside Playwright calls, so one already seen is in `failed`).
        for call in ("indices-list", "knn-service"):
            if call not in failed:
                page.wait_for_event("requestfailed", lambda r, call=call: r.url.endswith(call))
        if not any("blocked by CORS policy" in m for m in console):
            page.wait_for_event("console", lambda m: "blocked by CORS policy" in m.text)
        assert not {"indices-list", "knn-service"} & set(answered)
        browser.close()

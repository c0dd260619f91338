"""Ray Serve retrieval app: text / image / image-URL / vector queries against sharded indices.

```
HTTP -> RetrievalAPI (FastAPI ingress: validation, limits, metadata, the search page)
          -> QueryEncoder      (@serve.batch: texts and images of many requests per forward)
          -> IndexShardGroup x G (@serve.batch: grouped by (index, modality, k, vectors?);
                                  each group holds every G-th shard, so an index larger
                                  than a node splits over nodes)
          <- global top-k over the groups -> [near-duplicates out, by the hits' stored vectors]
          -> metadata (O(1) by id) -> JSON
```
Routes: ``/v1/search`` (ours, pydantic models, OpenAPI at ``/docs``), ``/knn-service``,
``/indices-list`` and ``/metadata`` (the LAION kNN API, for existing clients), ``/healthz``,
``/readyz``, ``/`` (a search page) and ``POST /admin/reload``.

A new index version (``react-ray index --append``) is picked up without downtime: on
``POST /admin/reload``, and by every shard-group replica on its own at most
``reload_interval_s`` after the manifest changed. The new version loads beside the old one
(sharing the shards both hold) and replaces it in one assignment; searches already running
finish on the old one. Metadata needs no reload: an id's file is found from the id itself.
"""

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, model_validator
from ray import serve

from react_ray.config import ModelConfig, RetrievalAppConfig
from react_ray.formats import storage
from react_ray.formats.embedding_set import unit_rows
from react_ray.formats.index_manifest import IndexManifest
from react_ray.index.sharded import (
    MetadataStore,
    ShardedIndex,
    index_root,
    merge_topk,
)
from react_ray.retrieve.fetch import FetchPolicy, download
from react_ray.retrieve.retrieval import remove_near_duplicates
from serve_apps.common import (
    Guard,
    decode_base64_image,
    decode_image_bytes,
    guard_requests,
    read_tokens,
    within,
)
from serve_apps.knn_options import AestheticSteering, ViolenceDetector, unsafe_mask

Modality = Literal["image", "text"]
PAGE = Path(__file__).with_name("search.html")


# ---------------------------------------------------------------- API models
class Query(BaseModel):
    text: str | None = Field(default=None, min_length=1)
    image: str | None = Field(default=None, description="base64 image bytes")
    image_url: str | None = None
    vector: list[float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Query":
        given = [
            k for k in ("text", "image", "image_url", "vector") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of text, image, image_url, vector; got {given or 'none'}"
            )
        return self


class SearchRequest(BaseModel):
    queries: list[Query] = Field(min_length=1)
    index: str
    modality: Modality = "image"
    k: int = Field(default=10, ge=1)
    deduplicate: bool = Field(
        default=False,
        description="drop near-duplicate hits (by their stored vectors, "
        "cosine >= the app's near_duplicate_threshold) and repeated URLs",
    )
    safe: bool = Field(
        default=False,
        description="drop unsafe hits: punsafe above safety.unsafe_threshold, or an unsafe NSFW "
        "label (422 when the index has neither column)",
    )
    no_violence: bool = Field(
        default=False, description="drop hits the violence detector flags (safety.violence_*)"
    )
    aesthetic_score: int | None = Field(
        default=None, ge=0, le=9, description="steer the query toward this aesthetic rating"
    )
    aesthetic_weight: float = Field(default=0.0, ge=0, le=10, allow_inf_nan=False)


class Hit(BaseModel):
    id: int
    score: float
    url: str | None = None
    caption: str | None = None


class SearchResponse(BaseModel):
    index: str
    modality: Modality
    results: list[list[Hit]]


class MetadataRequest(BaseModel):
    indice_name: str
    ids: list[Annotated[int, Field(ge=0, lt=2**63)]] = Field(max_length=10_000)


# clip-retrieval's /knn-service body, read by hand (its clients send no Content-Type; types are
# checked as JSON gives them), described here for the OpenAPI page and for API fuzzers.
KNN_REQUEST = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["modality", "num_images", "indice_name"],
                    "properties": {
                        "text": {"type": "string"},
                        "image": {"type": "string", "description": "base64"},
                        "image_url": {"type": "string"},
                        "embedding_input": {"type": "array", "items": {"type": "number"}},
                        "modality": {"type": "string", "enum": ["image", "text"]},
                        "indice_name": {"type": "string"},
                        "num_images": {"type": "integer", "minimum": 1},
                        "num_result_ids": {"type": "integer", "minimum": 1},
                        "deduplicate": {"type": "boolean"},
                        "use_safety_model": {"type": "boolean"},
                        "use_violence_detector": {"type": "boolean"},
                        "use_mclip": {"type": "boolean"},
                        "aesthetic_score": {
                            "type": ["integer", "string"],
                            "description": "0-9, or a string of one; empty: none",
                        },
                        "aesthetic_weight": {
                            "type": ["number", "string"],
                            "description": "a number, or a string of one; empty: none",
                        },
                    },
                }
            }
        },
    }
}


# ---------------------------------------------------------------- the LAION kNN API's body
def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPException(422, f"{name}: expected true or false, got {value!r}"[:200])
    return value


def _number(body: dict, name: str, kind: type):
    """clip back's int()/float() of a field that may be a number, a string of one, or empty."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HTTPException(422, f"{name}: expected a number, got {value!r}"[:200])
    try:
        number = kind(value)
    except (ValueError, OverflowError):
        raise HTTPException(422, f"{name}: expected a number, got {value!r}"[:200]) from None
    if kind is int and isinstance(value, float) and value != number:
        raise HTTPException(422, f"{name}: expected an integer, got {value!r}")
    return number


def knn_search_request(body) -> tuple[SearchRequest, int]:
    """clip-retrieval's /knn-service body -> (our SearchRequest, num_result_ids); types are
    checked as JSON gives them, and every option is honoured or refused."""
    if not isinstance(body, dict):
        raise HTTPException(422, "expected a JSON object")
    for required in ("modality", "num_images", "indice_name"):
        if required not in body:
            raise HTTPException(422, f"{required}: required field is missing")
    counts = {}
    for name in ("num_images", "num_result_ids"):
        value = body.get(name)
        if name == "num_result_ids" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HTTPException(422, f"{name}: expected a positive integer, got {value!r}"[:200])
        counts[name] = value
    if _flag(body, "use_mclip"):
        raise HTTPException(
            422,
            "use_mclip: this server has no multilingual text encoder; send use_mclip=false "
            "(the app encodes with its own model's text tower)",
        )
    aesthetic_score = _number(body, "aesthetic_score", int)
    aesthetic_weight = _number(body, "aesthetic_weight", float)
    if aesthetic_score is not None and aesthetic_weight is None:
        raise HTTPException(422, "aesthetic_weight: required with aesthetic_score")
    query_fields = {
        "text": "text",
        "image": "image",
        "image_url": "image_url",
        "embedding_input": "vector",
    }
    given = {
        ours: body[theirs] for theirs, ours in query_fields.items() if body.get(theirs) is not None
    }
    try:
        search = SearchRequest(
            queries=[Query(**given)],
            index=body["indice_name"],
            modality=body["modality"],
            k=counts["num_images"],
            deduplicate=_flag(body, "deduplicate"),
            safe=_flag(body, "use_safety_model"),
            no_violence=_flag(body, "use_violence_detector"),
            aesthetic_score=aesthetic_score,
            aesthetic_weight=aesthetic_weight or 0.0,
        )
    except ValueError as error:  # pydantic's ValidationError: which field, what was wrong
        raise HTTPException(422, str(error)) from None
    return search, counts.get("num_result_ids", counts["num_images"])


# ---------------------------------------------------------------- the parts and their calls
# (above the ingress: its replicas saw only the module names defined before the class)
def _call(target, method: str):
    """A deployment's method through its handle (``.remote``), or, colocated, the object's own."""
    bound = getattr(target, method)
    return getattr(bound, "remote", bound)


def _batching(config: RetrievalAppConfig) -> dict:
    return dict(
        batching=config.batching,
        max_batch_size=config.max_batch_size,
        batch_wait_timeout_s=config.batch_wait_timeout_s,
    )


def _encoder_args(config: RetrievalAppConfig) -> dict:
    return dict(model=config.model.model_dump(), **_batching(config))


def _group_args(config: RetrievalAppConfig, group: int) -> dict:
    return dict(
        indices={name: pair.model_dump() for name, pair in config.indices.items()},
        group=group,
        groups=config.shard_groups,
        memory_map=config.memory_map,
        reload_interval_s=config.reload_interval_s,
        **_batching(config),
    )


# ---------------------------------------------------------------- deployments
@serve.deployment(max_ongoing_requests=256)
class QueryEncoder:
    """The CLIP text and image towers; requests are batched across callers."""

    def __init__(
        self, model: dict, batching: bool, max_batch_size: int, batch_wait_timeout_s: float
    ):
        from react_ray.models import build_model

        self.clip = build_model(ModelConfig.model_validate(model))
        size = max_batch_size if batching else 1
        for method in (self.encode_texts, self.encode_images):
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def decode_args(self) -> dict:
        return self.clip.decode_args

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(lambda: self.clip.encode_texts(texts).numpy()))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_images(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        def run():
            batch = torch.stack([self.clip.preprocess(Image.fromarray(p)) for p in pixels])
            return self.clip.encode_images(batch).numpy()

        return list(await asyncio.to_thread(run))


@serve.deployment(max_ongoing_requests=256)
class IndexShardGroup:
    """Every ``groups``-th shard of each index, searched in batches grouped by (index, modality,
    k)."""

    def __init__(
        self,
        indices: dict,
        group: int,
        groups: int,
        batching: bool,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        memory_map: bool = False,
        reload_interval_s: float | None = None,
    ):
        self.indices = {
            (name, modality): ShardedIndex(uri, group=(group, groups), memory_map=memory_map)
            for name, pair in indices.items()
            for modality, uri in pair.items()
            if uri
        }
        self.search.set_max_batch_size(max_batch_size if batching else 1)
        self.search.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.reload_interval_s, self._checked, self._reloading = (
            reload_interval_s,
            time.monotonic(),
            threading.Lock(),
        )

    def _reload(self) -> dict[str, int]:
        with self._reloading:
            for key, index in list(self.indices.items()):
                newer = index.reloaded()
                if newer is not None:
                    self.indices[key] = (
                        newer  # one assignment: a search holds either the old or the new index
                    )
            return self._versions()

    def _versions(self) -> dict[str, int]:
        return {
            f"{name}/{modality}": index.version for (name, modality), index in self.indices.items()
        }

    async def versions(self) -> dict[str, int]:
        return self._versions()

    async def reload(self) -> dict[str, int]:
        """Load every index whose manifest has a newer version, then swap it in; the versions now
        served."""
        return await asyncio.to_thread(self._reload)

    def _reload_if_due(self) -> threading.Thread | None:
        """At most every reload_interval_s, in the background: searches never wait for it."""
        if (
            not self.reload_interval_s
            or time.monotonic() - self._checked < self.reload_interval_s
            or self._reloading.locked()
        ):
            return None
        self._checked = time.monotonic()
        thread = threading.Thread(target=self._reload, daemon=True)
        thread.start()
        return thread

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def search(self, keys: list[tuple], vectors: list[np.ndarray]) -> list[tuple]:
        """Each call: (index, modality, k, with_vectors) and its (n, d) queries -> (scores, ids, hit
        vectors or
        None). Never mixes two requests' k or index."""
        self._reload_if_due()
        out: list = [None] * len(keys)
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(tuple(key), []).append(i)

        def run():
            for (name, modality, k, with_vectors), members in groups.items():
                index = self.indices[(name, modality)]
                stacked = np.concatenate([vectors[i] for i in members])
                if not index.shards:
                    found = (
                        np.full((len(stacked), k), -np.inf, np.float32),
                        np.full((len(stacked), k), -1),
                        np.zeros((len(stacked), k, index.dim), np.float32),
                    )
                else:
                    found = (
                        index.search_with_vectors(stacked, k)
                        if with_vectors
                        else index.search(stacked, k)
                    )
                start = 0
                for i in members:
                    n = len(vectors[i])
                    out[i] = (
                        found[0][start : start + n],
                        found[1][start : start + n],
                        found[2][start : start + n] if with_vectors else None,
                    )
                    start += n

        await asyncio.to_thread(run)
        return out


app = FastAPI(
    title="react-ray retrieval",
    version="1",
    description="kNN search over LAION-style pairs; LAION kNN API compatible",
)
guard_requests(app)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(app)
class RetrievalAPI:
    def __init__(self, encoder, groups: list, config: dict, tokens: dict):
        self.config = RetrievalAppConfig.model_validate(config)
        app.state.guard = Guard(
            self.config.max_request_bytes, cors_origins=self.config.access.cors_origins, **tokens
        )
        self.manifests = {
            (name, modality): IndexManifest.read(uri)
            for name, pair in self.config.indices.items()
            for modality, uri in pair.model_dump().items()
            if uri
        }
        first = next(iter(self.manifests.values()))
        self.metadata = {
            key: MetadataStore(
                storage.join(index_root(getattr(self.config.indices[key[0]], key[1])), "metadata")
            )
            for key in self.manifests
        }
        self.dim, self.decode_args = first.dim, None
        for key, manifest in self.manifests.items():
            if manifest.model != self.config.model.name:
                raise ValueError(
                    f"index {key} was built with {manifest.model!r}, the app encodes with "
                    f"{self.config.model.name!r}"
                )
        if self.config.colocate:  # the same classes, called in this replica: no hops
            encoder, groups = self._colocated()
        self.encoder, self.groups = encoder, groups
        self.aesthetic = (
            AestheticSteering.load(self.config.aesthetic_embeddings, self.dim)
            if self.config.aesthetic_embeddings
            else None
        )
        self.violence = (
            ViolenceDetector.from_file(self.config.safety.violence_prompts, self.dim)
            if self.config.safety.violence_prompts
            else None  # from safety.violence_texts, encoded on first use
        )

    def _colocated(self) -> tuple:
        return QueryEncoder.func_or_class(**_encoder_args(self.config)), [
            IndexShardGroup.func_or_class(**_group_args(self.config, 0))
        ]

    # ------------------------------------------------------------ our API
    @app.post("/v1/search", response_model=SearchResponse)
    async def search_v1(self, request: SearchRequest) -> SearchResponse:
        found = await within(self.config.request_timeout_s, self._search(request), "search")
        results = [
            [
                Hit(id=i, score=s, url=(m or {}).get("url"), caption=(m or {}).get("caption"))
                for i, s, m in zip(hits["id"].tolist(), hits["score"].tolist(), hits["meta"])
            ]
            for hits in found
        ]
        return SearchResponse(index=request.index, modality=request.modality, results=results)

    async def _search(
        self, request: SearchRequest, candidates: int | None = None
    ) -> list[pd.DataFrame]:
        """Each query's best ``k`` hits after the request's filters: id, score, meta (the id's
        metadata). ``candidates``: how many to search for the filters to choose from (the LAION
        API's num_result_ids); by default k, or 3k when a filter may drop some."""
        key = (request.index, request.modality)
        if key not in self.manifests:
            known = sorted(f"{n}/{m}" for n, m in self.manifests)
            raise HTTPException(
                404,
                f"unknown index {request.index!r} with modality "
                f"{request.modality!r}; known: {', '.join(known)}",
            )
        for name, value in (("k", request.k), ("num_result_ids", candidates or 0)):
            if value > self.config.max_k:
                raise HTTPException(422, f"{name}: got {value}; the limit is {self.config.max_k}")
        if len(request.queries) > self.config.max_queries:
            raise HTTPException(
                413, f"{len(request.queries)} queries; the limit is {self.config.max_queries}"
            )
        filtering = request.deduplicate or request.safe or request.no_violence
        fetch_k = candidates or (request.k * 3 if filtering else request.k)
        with_vectors = request.deduplicate or request.no_violence
        if with_vectors and fetch_k * len(request.queries) > self.config.max_dedup_hits:
            raise HTTPException(
                422,
                f"deduplicate / violence filter: candidates x queries = "
                f"{fetch_k * len(request.queries):,}; the limit is "
                f"{self.config.max_dedup_hits:,} (each candidate travels with its vector)",
            )
        steering = self._steering(request)
        if request.no_violence and self.violence is None:
            encode = _call(self.encoder, "encode_texts")
            texts = self.config.safety.violence_texts
            self.violence = ViolenceDetector(
                np.stack(await asyncio.gather(*(encode(t) for t in texts)))
            )
        vectors = np.stack(
            await asyncio.gather(*(self._encode(q, i) for i, q in enumerate(request.queries)))
        )
        if steering is not None:
            vectors = self.aesthetic.steer(vectors, *steering)
        parts = await asyncio.gather(
            *(
                _call(g, "search")(
                    (request.index, request.modality, fetch_k, with_vectors), vectors
                )
                for g in self.groups
            )
        )
        scores, ids, *hit_vectors = (
            np.concatenate([p[i] for p in parts], 1) for i in range(3 if with_vectors else 2)
        )
        scores, ids, *hit_vectors = merge_topk(scores, ids, fetch_k, *hit_vectors)
        store = self.metadata[key]

        # filters and file reads: off the event loop
        def filtered() -> list[pd.DataFrame]:
            results = []
            for q, (row_scores, row_ids) in enumerate(zip(scores, ids)):
                found = row_ids >= 0
                hits = pd.DataFrame({"id": row_ids[found], "score": row_scores[found]})
                if filtering:
                    hits = self._filter(
                        hits, hit_vectors[0][q][found] if with_vectors else None, store, request
                    )
                hits = hits[: request.k].reset_index(drop=True)
                if "meta" not in hits:
                    hits["meta"] = store.lookup(hits["id"].to_numpy())
                results.append(hits)
            return results

        return await asyncio.to_thread(filtered)

    def _steering(self, request: SearchRequest) -> tuple[int, float] | None:
        if request.aesthetic_score is None or not request.aesthetic_weight:
            return None
        if self.aesthetic is None:
            raise HTTPException(
                422,
                "aesthetic_score: this server has no aesthetic embeddings for its model "
                "(aesthetic_embeddings: LAION's rating0-9.npy); send aesthetic_weight 0 or no "
                "aesthetic_score",
            )
        return request.aesthetic_score, request.aesthetic_weight

    def _filter(
        self,
        hits: pd.DataFrame,
        vectors: np.ndarray | None,
        store: MetadataStore,
        request: SearchRequest,
    ) -> pd.DataFrame:
        """The request's filters over the candidates, best first: violence, safety, then
        near-duplicates (by stored vector) and repeated URLs among what is left."""
        if request.safe or request.deduplicate:  # they read the metadata (punsafe, url)
            hits["meta"] = store.lookup(hits["id"].to_numpy())
        keep = np.ones(len(hits), bool)
        if request.no_violence:
            keep &= ~self.violence.violent(vectors)
        if request.safe:
            keep &= ~unsafe_mask(list(hits["meta"]), self.config.safety, request.index)
        hits = hits[keep].reset_index(drop=True)
        if request.deduplicate:
            vectors = unit_rows(vectors[keep])  # PQ decodes ~unit
            hits = remove_near_duplicates(hits, vectors, self.config.near_duplicate_threshold)
            urls = [(m or {}).get("url") for m in hits["meta"]]
            repeated = pd.Series(urls).duplicated().to_numpy() & pd.notna(urls)
            hits = hits[~repeated].reset_index(drop=True)
        return hits

    async def _encode(self, query: Query, i: int) -> np.ndarray:
        what = f"queries[{i}]"
        if query.vector is not None:
            vector = np.asarray(query.vector, np.float32)
            if vector.shape != (self.dim,):
                raise HTTPException(
                    422,
                    f"{what}.vector: got {vector.shape[0]} "
                    f"dimensions; the index holds {self.dim}-d vectors",
                )
            if not np.isfinite(vector).all() or not np.linalg.norm(vector):
                raise HTTPException(422, f"{what}.vector: must be finite and non-zero")
            return vector / np.linalg.norm(vector)
        if query.text is not None:
            if len(query.text) > self.config.max_text_chars:
                raise HTTPException(
                    422,
                    f"{what}.text: {len(query.text):,} characters; the limit is "
                    f"{self.config.max_text_chars}",
                )
            return await _call(self.encoder, "encode_texts")(query.text)
        if self.decode_args is None:
            self.decode_args = await _call(self.encoder, "decode_args")()
        if query.image is not None:
            pixels = await asyncio.to_thread(
                decode_base64_image,
                query.image,
                f"{what}.image",
                self.decode_args,
                self.config.max_image_pixels,
            )
        else:
            policy = FetchPolicy(
                timeout=self.config.image_url_timeout_s,
                deadline=self.config.image_url_deadline_s,
                retries=0,
                max_bytes=self.config.image_url_max_bytes,
                allowed_networks=tuple(self.config.image_url_allowed_networks),
            )
            data, reason, _ = await asyncio.to_thread(download, query.image_url, policy)
            # the reason only: no OS error text for a client to probe the network with
            if data is None:
                raise HTTPException(400, f"{what}.image_url: could not fetch the image ({reason})")
            pixels = await asyncio.to_thread(
                decode_image_bytes,
                data,
                f"{what}.image_url",
                self.decode_args,
                self.config.max_image_pixels,
            )
        return await _call(self.encoder, "encode_images")(pixels)

    # ------------------------------------------------------------ the LAION kNN API
    @app.get("/indices-list")
    async def indices_list(self) -> list[str]:
        return sorted(self.config.indices)

    @app.post("/knn-service", openapi_extra=KNN_REQUEST)
    async def knn_service(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError, bad UTF-8
            raise HTTPException(400, "the body is not valid JSON") from None
        search, candidates = knn_search_request(body)
        hits = (
            await within(self.config.request_timeout_s, self._search(search, candidates), "search")
        )[0]
        columns = self.config.columns_to_return
        return JSONResponse(
            [
                {
                    **{c: m[c] for c in columns if m and m.get(c) is not None},
                    "id": i,
                    "similarity": s,
                }
                for i, s, m in zip(hits["id"].tolist(), hits["score"].tolist(), hits["meta"])
            ]
        )

    @app.post("/metadata")
    async def metadata(self, request: MetadataRequest) -> list[dict]:
        key = next(((n, m) for n, m in self.manifests if n == request.indice_name), None)
        if key is None:
            raise HTTPException(
                404,
                f"unknown index {request.indice_name!r}; known: "
                f"{', '.join(sorted(self.config.indices))}",
            )
        metas = await asyncio.to_thread(self.metadata[key].lookup, request.ids)
        return [
            # url, caption, key, LAION columns
            {
                "id": i,
                "metadata": {k: v for k, v in m.items() if k != "id"},
            }
            for i, m in zip(request.ids, metas)
            if m is not None
        ]

    # ------------------------------------------------------------ health and page
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        await asyncio.gather(
            _call(self.encoder, "decode_args")(),
            *(
                _call(g, "search")((n, m, 1, False), np.zeros((1, self.dim), np.float32))
                for g in self.groups
                for n, m in list(self.manifests)[:1]
            ),
        )
        versions = await asyncio.gather(*(_call(g, "versions")() for g in self.groups))
        return {
            "status": "ready",
            "indices": sorted(self.config.indices),
            "shard_groups": len(self.groups),
            "versions": versions,
        }

    @app.post("/admin/reload")
    async def reload(self) -> dict:
        """Pick up new index versions now (each group's replica that takes the call; the others
        within reload_interval_s). Answers with the versions each group serves afterwards."""
        try:
            versions = await asyncio.gather(*(_call(g, "reload")() for g in self.groups))
        except (
            ValueError,
            FileNotFoundError,
        ) as error:  # e.g. the index was rebuilt with another model
            raise HTTPException(
                409, f"reload refused, still serving the previous version: {error}"
            ) from None
        return {"versions": versions}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return PAGE.read_text()


def build_app(args: dict) -> serve.Application:
    """``serve deploy`` / ``serve.run`` entry: ``import_path: serve_apps.retrieval:build_app``."""
    config = RetrievalAppConfig.model_validate(args)
    cpus = {"ray_actor_options": config.replica.ray_options()}
    if config.colocate:  # the ingress builds both itself
        encoder, groups = None, []
    else:
        encoder = QueryEncoder.options(**cpus).bind(**_encoder_args(config))
        groups = [
            IndexShardGroup.options(name=f"IndexShardGroup{g}", **cpus).bind(
                **_group_args(config, g)
            )
            for g in range(config.shard_groups)
        ]
    return RetrievalAPI.options(**cpus).bind(
        encoder, groups, config.model_dump(mode="json"), read_tokens(config.access)
    )

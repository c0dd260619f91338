"""Sharded FAISS indices: planning, parallel build on Ray, exact merge, tuning, lookups, errors,
s3."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from react_ray.config import IndexConfig
from react_ray.formats import ids, storage
from react_ray.formats.embedding_set import fetch_vectors, load_embeddings
from react_ray.formats.index_manifest import IndexManifest
from react_ray.index import sharded
from react_ray.index.build import quantization_drift
from react_ray.index.plan import plan_index
from react_ray.index.sharded import (
    ShardedIndex,
    decodable,
    merge_topk,
    search_and_reconstruct,
)
from react_ray.index.tune import REFINE_KNOB, recall_at_k
from react_ray.jobs.index import append_to_index, build_index
from react_ray.synthetic.embeddings import (
    ClipSpace,
    geometry_figures,
    write_clustered_embedding_set,
)

GB = 2**30


@pytest.mark.parametrize(
    "n, dim, budget_gb, cross_modal, expected",
    [
        (50_000, 512, 16, False, "IDMap,Flat"),
        (1_000_000, 512, 16, False, "IDMap,HNSW32"),
        # captions against image keys: no graph; raw vectors re-rank fast-scan candidates
        (1_000_000, 512, 16, True, "IDMap,IVF2048,PQ256x4fs,RFlat"),
        (20_000_000, 512, 64, False, "IDMap,IVF8192,PQ256x4fs,RFlat"),
        (20_000_000, 512, 40, False, "IVF16384,Flat"),  # raw vectors fit, the codes too do not
        (1_000_000, 511, 16, True, "IVF4096,Flat"),  # an odd dim: no 2-d sub-quantizers
        (1_000_000, 64, 16, True, "IVF4096,Flat"),  # too few dims for the codes to rank
        (20_000_000, 512, 16, False, "IVF16384,SQ8"),
        (20_000_000, 512, 4, False, "IVF16384,PQ128x8"),
        (1_000_000_000, 512, 64, False, "OPQ32_128,IVF262144_HNSW32,PQ32x8"),
    ],
)
def test_planner_picks_the_most_accurate_index_that_fits(n, dim, budget_gb, cross_modal, expected):
    plan = plan_index(n, dim, budget_gb * GB, cross_modal)
    assert plan.factory == expected and plan.estimated_bytes <= budget_gb * GB


def test_planner_refuses_an_impossible_budget():
    with pytest.raises(
        ValueError,
        match=r"5,000,000,000 x 768 vectors need at least .* the memory budget is 16.0 GB",
    ):
        plan_index(5_000_000_000, 768, 16 * GB)


def test_merge_topk_is_exact_and_drops_missing():
    scores = np.array([[0.9, 0.1, 0.8, -3e38]], np.float32)
    labels = np.array([[1, 2, 3, -1]])
    top_scores, top_ids = merge_topk(scores, labels, 3)
    assert top_ids.tolist() == [[1, 3, 2]] and np.allclose(top_scores, [[0.9, 0.8, 0.1]])


@pytest.mark.parametrize(
    "factory",
    ["IDMap,Flat", "IDMap,HNSW16", "IDMap,IVF16,PQ16x4fs,RFlat", "IVF16,SQ8", "OPQ8,IVF16,PQ8x4"],
)
def test_search_and_reconstruct_returns_each_hits_stored_vector(factory):
    """What served deduplication compares: the same hits as search, with vectors close to the
    originals."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_ids = ids.encode(3, np.arange(4000) * 2)  # sparse, large ids as in a real index
    index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, row_ids)
    _, found, decoded = search_and_reconstruct(index, vectors[:20], 5)
    assert np.array_equal(found, index.search(vectors[:20], 5)[1]) and decoded.shape == (20, 5, 32)
    originals = vectors[np.searchsorted(row_ids, found)]
    # Exact indices give the vector back; quantized ones give the codec's decoding of it.
    expected = (
        originals
        if factory.startswith("IDMap")
        else index.sa_decode(index.sa_encode(originals.reshape(-1, 32))).reshape(originals.shape)
    )
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    # truly lossy: no shortcut
    assert factory.startswith("IDMap") or np.abs(decoded - originals).max() > 1e-3


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emb"))
    write_clustered_embedding_set(out, num_files=6, rows_per_file=1500, dim=64, skip_every=7)
    return out


def _config(embeddings: str, output: str, **kw) -> IndexConfig:
    return IndexConfig(
        embeddings=embeddings, output=output, train_samples=5000, tune_queries=100, **kw
    )


def _exact(embeddings: str, queries: np.ndarray, k: int, column: str = "img_emb"):
    all_ids, vectors = load_embeddings(embeddings, column)
    scores = queries @ vectors.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), all_ids[order]


def assert_exact_hits(scores, found, exact_scores, exact_ids, atol=1e-5):
    """The exact top-k (``exact_*`` hold k + 1 hits), up to the order of hits whose scores tie
    within rounding (float16 keys summed in another order give another last bit)."""
    k = found.shape[1]
    np.testing.assert_allclose(scores, exact_scores[:, :k], atol=atol)
    tied = np.abs(exact_scores[:, :, None] - exact_scores[:, None, :]) <= atol
    tied = (tied.sum(axis=2) > 1)[:, :k]
    # a tie at the k-th place may bring in the (k+1)-th: the scores above vouch for it
    assert np.array_equal(found[~tied], exact_ids[:, :k][~tied])


def test_tuning_ground_truth_is_exact_whatever_the_chunks_and_file_order(embeddings):
    """Each file's top-k over chunks of its rows, merged across files as results come: the exact
    top-k of the whole set (the index wiring runs the files on Ray tasks)."""
    from react_ray.formats.embedding_set import committed_files
    from react_ray.index.tune import exact_ground_truth, file_top_k

    _, files = committed_files(embeddings)
    queries = np.random.default_rng(3).standard_normal((20, 64)).astype(np.float32)
    expected = _exact(embeddings, queries, 7)[1]
    assert len(files) > 1
    assert np.array_equal(exact_ground_truth(queries, files, "img_emb", 7), expected)

    def small_chunks_backwards(queries, files, column, k):
        return (file_top_k(queries, f.uri, column, k, chunk_rows=33) for f in files[::-1])

    found = exact_ground_truth(queries, files, "img_emb", 7, file_results=small_chunks_backwards)
    assert np.array_equal(found, expected)


@pytest.mark.ray
def test_sharded_flat_equals_single_exact_search(ray_local, embeddings, tmp_path):
    manifest = build_index(
        _config(
            embeddings, str(tmp_path / "idx"), factory="IDMap,Flat", num_shards=3, files_per_task=1
        ),
        progress=False,
    )
    assert [s.count for s in manifest.shards] == [2 * (1500 - len(range(6, 1500, 7)))] * 3
    index = ShardedIndex(str(tmp_path / "idx"), expect_model="synthetic", expect_dim=64)
    queries = load_embeddings(embeddings, "txt_emb")[1][::97].astype(np.float32)
    scores, found = index.search(queries, 10)
    assert_exact_hits(scores, found, *_exact(embeddings, queries, 11))
    # Each hit maps back to its own metadata in O(1) (captions carry the id).
    for meta, id_ in zip(index.lookup(found[0]), found[0]):
        assert meta["caption"] == f"caption of {id_}" and meta["url"] == f"http://img/{id_}.jpg"
    assert index.lookup([int(ids.encode(0, 6))]) == [None]  # a skipped row is not there


@pytest.mark.ray
def test_ivf_pq_recall_on_clustered_text_queries_and_tuning(ray_local, embeddings, tmp_path):
    manifest = build_index(
        _config(
            embeddings,
            str(tmp_path / "idx"),
            factory="IVF64,PQ64x4fs",
            num_shards=2,
            target_recall=0.8,
        ),
        progress=False,
    )
    tuning = manifest.tuning
    assert tuning["reached"] and manifest.search_params["nprobe"] == tuning["curve"][-1]["nprobe"]
    assert tuning["queries"].startswith("100 caption embeddings (txt_emb) against img_emb")
    nprobes = [point["nprobe"] for point in tuning["curve"]]
    assert nprobes == sorted(nprobes) and all(p["recall"] < 0.8 for p in tuning["curve"][:-1])
    # Independent check on other text queries with the stored parameters.
    index = ShardedIndex(str(tmp_path / "idx"))
    queries = load_embeddings(embeddings, "txt_emb")[1][5::50].astype(np.float32)
    recall = recall_at_k(index.search(queries, 10)[1], _exact(embeddings, queries, 10)[1])
    assert recall >= 0.75, recall
    # Fast-scan lists cannot be decoded once loaded: served dedup reads the hits' exact vectors
    # instead.
    assert not any(decodable(shard) for shard in index.shards)
    _, found, vectors = index.search_with_vectors(queries[:5], 10)
    assert np.array_equal(found, index.search(queries[:5], 10)[1])
    np.testing.assert_array_equal(vectors.reshape(-1, 64), fetch_vectors(embeddings, found.ravel()))


def test_synthetic_pairs_have_clips_geometry(tmp_path):
    """The figures ClipGeometry's docstring states, at two dims: matched pairs only weakly similar,
    the modalities in two cones far apart, a caption's own image not trivially its nearest."""
    for dim in (64, 256):
        space = ClipSpace(np.random.default_rng(0), dim, 300)
        figures = geometry_figures(*space.pairs(np.random.default_rng(1), 5000))
        assert 0.28 <= figures["matched_cosine"] <= 0.38, figures
        assert 0.15 <= figures["unmatched_cosine"] <= 0.23, figures
        assert 0.75 <= figures["modality_gap"] <= 0.87, figures
        assert 0.35 <= figures["image_image_cosine"] <= 0.55, figures
        assert 0.5 <= figures["text_text_cosine"] <= 0.7, figures
        assert 0.01 < figures["text_to_image_r1"] < 0.5, figures
    # the older isotropic clusters: a caption is its image plus noise
    old = str(tmp_path / "old")
    write_clustered_embedding_set(old, num_files=1, rows_per_file=2000, dim=64, geometry=None)
    old_figures = geometry_figures(*(load_embeddings(old, c)[1] for c in ("img_emb", "txt_emb")))
    assert old_figures["matched_cosine"] > 0.8 and old_figures["modality_gap"] < 0.1


@pytest.mark.ray
def test_co_located_ivf_shards_are_searched_as_one_index(ray_local, embeddings, tmp_path):
    """Three IVF shards of one build (one trained coarse quantizer) are joined into one index at
    load: one coarse search and one scan per query, the same hits as the build unsharded and as
    the shards searched side by side (memory-mapped), at every nprobe, one query or a batch."""
    one = _config(embeddings, str(tmp_path / "one"), factory="IVF32,Flat", target_recall=0.9)
    built = build_index(one, progress=False)
    (tmp_path / "three").mkdir()  # the same trained quantizer, so the same lists
    (tmp_path / "three" / "_trained.index").write_bytes(
        (tmp_path / "one" / "_trained.index").read_bytes()
    )
    three = one.model_copy(update={"output": str(tmp_path / "three"), "num_shards": 3})
    assert len(build_index(three, progress=False).shards) == 3
    joined, single = ShardedIndex(three.output), ShardedIndex(one.output)
    mapped = ShardedIndex(three.output, memory_map=True)
    assert (len(joined.shards), len(single.shards), len(mapped.shards)) == (1, 1, 3)
    assert joined.ntotal == single.ntotal == mapped.ntotal == built.ntotal
    assert joined.files == [s.file for s in IndexManifest.read(three.output).shards]
    queries = load_embeddings(embeddings, "txt_emb")[1][3::41].astype(np.float32)
    for nprobe in (1, 4, 32):
        for index in (joined, single, mapped):
            index.set_params({"nprobe": nprobe})
        (scores, found), *others = [index.search(queries, 10) for index in (joined, single, mapped)]
        assert all(np.array_equal(found, other[1]) for other in others)
        alone = np.concatenate([joined.search(q[None], 10)[1] for q in queries[:5]])
        assert np.array_equal(alone, found[:5])
    assert_exact_hits(scores, found, *_exact(embeddings, queries, 11))  # all 32 lists: exact
    # one list probed for half the set: each row ends in missing hits, scored -inf, alone or not
    joined.set_params({"nprobe": 1})
    k = joined.ntotal // 2
    batch = joined.search(queries[:3], k)
    for i, query in enumerate(queries[:3]):
        for scores_of, found_of in (
            joined.search(query[None], k),
            (batch[0][i : i + 1], batch[1][i : i + 1]),
        ):
            missing = found_of[0] < 0
            assert (
                0 < missing.sum() < k and missing[-1] and np.isneginf(scores_of[0][missing]).all()
            )
            assert np.isfinite(scores_of[0][~missing]).all()
    # text queries on CLIP's geometry: the tuned nprobe reaches the target on other captions too
    joined.set_params(built.search_params)
    assert built.tuning["reached"] and built.search_params["nprobe"] < 32
    assert recall_at_k(joined.search(queries, 10)[1], _exact(embeddings, queries, 10)[1]) >= 0.85


@pytest.mark.ray
def test_reranked_fast_scan_shards_join_keep_their_ids_and_tune_both_knobs(
    ray_local, embeddings, tmp_path, monkeypatch
):
    """The planned index where raw vectors fit: fast-scan codes pick candidates, raw vectors
    re-rank them. Three shards join into one (codes, raw vectors and id map appended in step):
    with every list probed and every vector a candidate it is exact search, joined or side by
    side. Tuned, it reaches the target with the fewest candidates that keep it, and gives exact
    scores and the raw vectors of its hits; a large k re-ranks a bounded number of candidates; an
    append's drift is measured on its codes."""
    config = _config(
        embeddings,
        str(tmp_path / "idx"),
        factory="IDMap,IVF32,PQ32x4fs,RFlat",
        num_shards=3,
        files_per_task=1,
        target_recall=0.9,
    )
    built = build_index(config, progress=False)
    joined, mapped = ShardedIndex(config.output), ShardedIndex(config.output, memory_map=True)
    assert (len(built.shards), len(joined.shards), len(mapped.shards)) == (3, 1, 3)
    assert joined.ntotal == mapped.ntotal == built.ntotal
    queries = load_embeddings(embeddings, "txt_emb")[1][3::41].astype(np.float32)
    exact_scores, exact_ids = _exact(embeddings, queries, 11)
    for index in (joined, mapped):
        index.set_params({"nprobe": 32, "k_factor_rf": built.ntotal})
        assert_exact_hits(*index.search(queries, 10), exact_scores, exact_ids)
        # one at a time, the probed lists spread over the threads: the same exact hits
        for i, query in enumerate(queries):
            found = index.search(query, 10)
            assert_exact_hits(*found, exact_scores[i : i + 1], exact_ids[i : i + 1])
        assert {ivf.implem for ivf, _ in index._fast_scans} == {15}
    # tuned: nprobe with the most candidates, then the fewest candidates that keep the target
    params, curve = built.search_params, built.tuning["curve"]
    assert built.tuning["reached"] and set(params) == {"nprobe", "k_factor_rf"}
    reached = next(i for i, p in enumerate(curve) if p["recall"] >= 0.9)
    most = REFINE_KNOB[1][-1]
    assert all(p["k_factor_rf"] == most for p in curve[: reached + 1]) and params["nprobe"] < 32
    fewer = curve[reached + 1 :]
    assert [p["k_factor_rf"] for p in fewer][-1] == params["k_factor_rf"]
    assert all(p["recall"] < 0.9 for p in fewer[:-1]) and fewer[-1]["recall"] >= 0.9
    joined.set_params(params)
    scores, found, vectors = joined.search_with_vectors(queries, 10)
    assert recall_at_k(found, exact_ids[:, :10]) >= 0.85
    np.testing.assert_array_equal(vectors.reshape(-1, 64), fetch_vectors(embeddings, found.ravel()))
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors), atol=1e-5)
    # a large k re-ranks at most MAX_CANDIDATES per query: fewer candidates, still exact scores
    joined.set_params({"nprobe": 32, "k_factor_rf": 64})
    truth = _exact(embeddings, queries, 50)[1]
    full = joined.search(queries, 50)[1]
    monkeypatch.setattr(sharded, "MAX_CANDIDATES", 50)
    joined.set_params({"nprobe": 32, "k_factor_rf": 64})  # the cap is read with the params
    scores, capped = joined.search(queries, 50)
    assert (capped >= 0).all() and recall_at_k(capped, truth) < recall_at_k(full, truth)
    vectors = fetch_vectors(embeddings, capped.ravel()).reshape(*capped.shape, 64)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors), atol=1e-5)
    trained = (tmp_path / "idx" / "_trained.index").read_bytes()
    images = load_embeddings(embeddings, "img_emb")[1].astype(np.float32)
    drift = quantization_drift(trained, images[:2000], images[-2000:])
    assert 0 < drift["old"]["code_error"] < 0.5 and 0.8 < drift["code_error_ratio"] < 1.25


@pytest.mark.ray
def test_rebuild_in_another_shard_order_maps_ids_to_the_same_metadata(
    ray_local, embeddings, tmp_path
):
    a = build_index(
        _config(embeddings, str(tmp_path / "a"), factory="IDMap,Flat", num_shards=2), progress=False
    )
    b = build_index(
        _config(
            embeddings, str(tmp_path / "b"), factory="IDMap,Flat", num_shards=4, files_per_task=1
        ),
        progress=False,
    )
    assert a.shards[0].embedding_files != b.shards[0].embedding_files
    queries = load_embeddings(embeddings, "txt_emb")[1][::301].astype(np.float32)
    ia, ib = ShardedIndex(str(tmp_path / "a")), ShardedIndex(str(tmp_path / "b"))
    found_a, found_b = ia.search(queries, 5)[1], ib.search(queries, 5)[1]
    assert np.array_equal(found_a, found_b)
    assert ia.lookup(found_a.ravel()) == ib.lookup(found_b.ravel())
    assert all(
        m["caption"] == f"caption of {i}"
        for m, i in zip(ib.lookup(found_b.ravel()), found_b.ravel())
    )


@pytest.mark.ray
def test_rerun_skips_finished_work_and_refuses_another_build(ray_local, embeddings, tmp_path):
    out = tmp_path / "idx"
    build_index(_config(embeddings, str(out), factory="IDMap,Flat", num_shards=2), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.index")}
    build_index(_config(embeddings, str(out), factory="IDMap,Flat", num_shards=2), progress=False)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.index")}
    with pytest.raises(ValueError, match="holds another build \\(differs in factory\\)"):
        build_index(
            _config(embeddings, str(out), factory="IVF16,Flat", num_shards=2), progress=False
        )


@pytest.mark.ray
def test_text_to_text_keys(ray_local, embeddings, tmp_path):
    manifest = build_index(
        _config(
            embeddings, str(tmp_path / "idx"), keys="text", factory="IDMap,HNSW32", num_shards=2
        ),
        progress=False,
    )
    assert manifest.key_column == "txt_emb" and "efSearch" in manifest.search_params
    queries = load_embeddings(embeddings, "txt_emb")[1][:20].astype(np.float32)
    found = ShardedIndex(str(tmp_path / "idx")).search(queries, 1)[1][:, 0]
    # a caption finds itself
    assert np.array_equal(found, load_embeddings(embeddings, "txt_emb")[0][:20])


def test_broken_indices_give_errors_naming_the_file(embeddings, tmp_path, ray_local):
    out = tmp_path / "idx"
    build_index(_config(embeddings, str(out), factory="IDMap,Flat", num_shards=2), progress=False)
    with pytest.raises(ValueError, match="was built with model 'synthetic', not 'ViT-B-32'"):
        ShardedIndex(str(out), expect_model="ViT-B-32")
    with pytest.raises(ValueError, match="holds 64-d vectors; the queries are 512-d"):
        ShardedIndex(str(out), expect_dim=512)
    with pytest.raises(ValueError, match="queries are 32-d"):
        ShardedIndex(str(out)).search(np.zeros((1, 32), np.float32), 5)
    shard = out / "shard-00001.index"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"index shard .*shard-00001.index is corrupt"):
        ShardedIndex(str(out))
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(
        ValueError, match=r"index shard .*shard-00001.index cannot be read by faiss"
    ):
        ShardedIndex(str(out), verify=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"index shard missing: .*shard-00001.index"):
        ShardedIndex(str(out))
    with pytest.raises(ValueError, match="use_gpu: this faiss build sees no GPU"):
        build_index(_config(embeddings, str(tmp_path / "gpu"), use_gpu=True), progress=False)


@pytest.mark.ray
@pytest.mark.s3
def test_build_to_and_load_from_s3(ray_local, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("REACT_RAY_CACHE", str(tmp_path / "cache"))
    emb = f"{s3_bucket}/emb"
    write_clustered_embedding_set(emb, num_files=3, rows_per_file=400, dim=32)
    manifest = build_index(
        IndexConfig(
            embeddings=emb,
            output=f"{s3_bucket}/idx",
            factory="IDMap,Flat",
            num_shards=2,
            train_samples=500,
            tune_queries=50,
        ),
        progress=False,
    )
    assert (
        json.loads(storage.read_bytes(f"{s3_bucket}/idx/manifest.json"))["ntotal"]
        == manifest.ntotal
        == 1200
    )
    index = ShardedIndex(f"{s3_bucket}/idx", expect_dim=32)
    queries = load_embeddings(emb, "txt_emb")[1][:5].astype(np.float32)
    scores, found = index.search(queries, 3)
    assert found.shape == (5, 3) and all(m is not None for m in index.lookup(found.ravel()))


def _hide_markers(emb, names) -> dict:
    """Take shards' completion markers away (they "arrive later"); return them to put back."""
    markers = {name: (emb / f"{name}.done").read_bytes() for name in names}
    for name in names:
        (emb / f"{name}.done").unlink()
    return markers


@pytest.mark.ray
def test_append_equals_a_one_shot_build_and_a_crash_leaves_the_previous_version(
    ray_local, tmp_path, monkeypatch
):
    from react_ray.index import build, sharded

    emb = tmp_path / "emb"
    write_clustered_embedding_set(str(emb), num_files=6, rows_per_file=800, dim=64)
    markers = _hide_markers(emb, [f"part-{n:06d}" for n in (3, 4, 5)])
    config = _config(str(emb), str(tmp_path / "grown"), factory="IVF16,Flat", num_shards=2)
    first = build_index(config, progress=False)
    assert (first.version, first.ntotal) == (1, 2400)
    late = markers.pop("part-000005")
    for name, data in markers.items():
        (emb / f"{name}.done").write_bytes(data)

    def crash(*args):
        raise RuntimeError("killed while appending")

    # after the new shards are written, before publishing
    monkeypatch.setattr(build, "_describe_shard", crash)
    with pytest.raises(RuntimeError, match="killed while appending"):
        # files 3, 4 -> shard 2
        append_to_index(config.model_copy(update={"num_shards": 1}), progress=False)
    monkeypatch.undo()
    assert (
        IndexManifest.read(config.output).version == 1
        and ShardedIndex(config.output).ntotal == 2400
    )
    # as two replica groups hold it
    served = {g: ShardedIndex(config.output, group=(g, 2)) for g in (0, 1)}
    assert served[0].reloaded() is None
    # Before the rerun, another file arrives and the operator asks for two shards: without the plan,
    # files 3 and 5 would be listed for the shard already written with 3 and 4 (5 absent, 4 twice).
    # The rerun finishes the append as planned; file 5 waits for the next one.
    (emb / "part-000005.done").write_bytes(late)
    grown = append_to_index(config, progress=False)  # the written shard is reused
    # a reload reads only the new shard of its group, joined to a copy of the one it holds
    read, real_load = [], sharded.load_shard
    monkeypatch.setattr(
        sharded, "load_shard", lambda uri, *a: read.append(uri) or real_load(uri, *a)
    )
    held = served[0].shards[0].ntotal
    new = served[0].reloaded()
    monkeypatch.undo()
    assert (served[0].version, new.version, new.files) == (
        1,
        2,
        ["shard-00000.index", "shard-00002.index"],
    )
    assert [uri.rsplit("/", 1)[-1] for uri in read] == ["shard-00002.index"]
    assert served[0].shards[0].ntotal == held and new.ntotal == held + 1600  # the old one intact
    assert new.reloaded() is None
    assert (grown.version, grown.ntotal, len(grown.shards)) == (2, 4000, 3)
    listed = [uri.rsplit("/", 1)[-1] for uri in grown.shards[2].embedding_files]
    assert sorted(listed) == ["part-000003.parquet", "part-000004.parquet"]
    assert ShardedIndex(config.output).ntotal == 4000  # five files of 800, none twice
    assert IndexManifest.read(str(tmp_path / "grown" / "manifest-v1.json")).ntotal == 2400
    drift = grown.appends[0].drift
    # same distribution
    assert 0.8 < drift["coarse_error_ratio"] < 1.2 and drift["code_error_ratio"] is None
    third = append_to_index(config, progress=False)  # the late file, in a fresh plan
    assert (third.version, third.ntotal, len(third.shards)) == (3, 4800, 4)
    assert append_to_index(config, progress=False).version == 3  # nothing new: nothing changes

    # A one-shot build over all six files with the same trained quantizer finds the same neighbours.
    (tmp_path / "oneshot").mkdir()
    (tmp_path / "oneshot" / "_trained.index").write_bytes(
        (tmp_path / "grown" / "_trained.index").read_bytes()
    )
    build_index(
        _config(str(emb), str(tmp_path / "oneshot"), factory="IVF16,Flat", num_shards=2),
        progress=False,
    )
    queries = load_embeddings(str(emb), "txt_emb")[1][::97].astype(np.float32)
    appended, oneshot = ShardedIndex(config.output), ShardedIndex(str(tmp_path / "oneshot"))
    for index in (appended, oneshot):
        index.set_params({"nprobe": 4})
    (a_scores, a_ids), (o_scores, o_ids) = appended.search(queries, 10), oneshot.search(queries, 10)
    assert np.array_equal(a_ids, o_ids)
    np.testing.assert_allclose(a_scores, o_scores, atol=1e-6)


@pytest.mark.ray
def test_append_warns_when_new_vectors_drift_from_the_build(ray_local, tmp_path, capsys):
    emb, other = tmp_path / "emb", tmp_path / "other"
    write_clustered_embedding_set(str(emb), num_files=4, rows_per_file=800, dim=64, seed=0)
    write_clustered_embedding_set(
        str(other), num_files=4, rows_per_file=800, dim=64, seed=7, num_clusters=3, spread=0.05
    )
    for name in ("part-000002", "part-000003"):  # the new crawl covers a few topics only
        for suffix in (".parquet", ".done", ".stats.json"):
            (emb / f"{name}{suffix}").write_bytes((other / f"{name}{suffix}").read_bytes())
    markers = _hide_markers(emb, ["part-000002", "part-000003"])
    config = _config(str(emb), str(tmp_path / "idx"), factory="IVF16,PQ16x4", num_shards=1)
    build_index(config, progress=False)
    for name, data in markers.items():
        (emb / f"{name}.done").write_bytes(data)
    capsys.readouterr()
    drift = append_to_index(config, progress=False).appends[0].drift
    assert drift["imbalance_ratio"] > 1.5  # the new vectors crowd into a few of the trained lists
    assert "WARNING the new vectors drift from the build's" in capsys.readouterr().out


def test_a_second_build_or_append_is_refused_while_one_writes_the_index(tmp_path):
    """Two appends at once would publish the same version from different shards: the second is
    refused before it reads anything (the first here: a lease this test holds)."""
    from react_ray.leases import LeaseHeld, output_lease

    config = _config(str(tmp_path / "emb"), str(tmp_path / "index"), factory="IDMap,Flat")
    with output_lease(config.output, "index --append") as held:
        for run in (append_to_index, build_index):
            with pytest.raises(
                LeaseHeld,
                match=rf"is being written by the index --append run {held['owner'][:8]} "
                rf"\(host .*, pid {os.getpid()},",
            ):
                run(config, progress=False)
    assert not (tmp_path / "index" / "_lease.json").exists()


def test_metadata_lookups_touch_storage_once_per_file(tmp_path, monkeypatch):
    """10,000 ids from three files that do not exist: three existence checks, not 10,000 (one per
    request on S3 each), and none on the next request."""
    from react_ray.index import sharded

    calls = []
    real = sharded.storage.exists
    monkeypatch.setattr(sharded.storage, "exists", lambda uri: calls.append(uri) or real(uri))
    store = sharded.MetadataStore(str(tmp_path / "metadata"))
    wanted = [int(ids.encode(shard, row)) for shard in (7, 8, 9) for row in range(3334)][:10_000]
    assert store.lookup(wanted) == [None] * 10_000
    assert len(calls) == 3
    store.lookup(wanted)
    assert len(calls) == 3


def test_fast_scan_routines_picked_for_speed_give_faiss_own_hits():
    """Where :func:`fast_scan_implem` takes another of faiss's routines than faiss would (one
    query probing many lists; batches of 256-d and more probing few), a re-ranked fast-scan
    index still gives faiss's own choice's hits: the exact top-k of the probed lists."""
    from react_ray.index.sharded import fast_scan_implem

    rng = np.random.default_rng(5)
    dim, n = 256, 4000
    centres = rng.normal(size=(30, dim))
    vectors = centres[rng.integers(0, 30, n)] + 0.5 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    index = faiss.index_factory(dim, "IDMap,IVF32,PQ128x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64) * 3 + 1)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    faiss.downcast_index(index.index).k_factor = 8
    queries = vectors[:40] + 0.3 * rng.normal(size=(40, dim)).astype(np.float32)
    for batch, nprobe, k in ((queries[:1], 16, 10), (queries[:1], 32, 50), (queries, 4, 10)):
        ivf.nprobe = nprobe
        chosen = fast_scan_implem(len(batch), dim, nprobe, 8 * k)
        assert chosen in (14, 15)
        ivf.implem = 0
        want_scores, want_ids = index.search(batch, k)
        ivf.implem = chosen
        scores, ids = index.search(batch, k)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
        assert np.mean(ids == want_ids) > 0.99  # scores equal: differ only where hits tie
    assert fast_scan_implem(256, 128, 4, 80) == fast_scan_implem(1, 128, 4, 80) == 0


def test_first_top_k_keeps_what_a_stable_sort_keeps():
    """Linear-time top-k of the ground truth: the same positions as a stable full sort, ties at
    the k-th included (scores drawn from 6 values: every row is full of ties)."""
    from react_ray.index.tune import first_top_k

    rng = np.random.default_rng(11)
    for k in (1, 5, 40):
        scores = rng.integers(0, 6, size=(30, 50)).astype(np.float32)
        want = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
        assert np.array_equal(first_top_k(scores, k), want)
    assert np.array_equal(first_top_k(scores[:, :3], 5), np.tile(np.arange(3), (30, 1)))

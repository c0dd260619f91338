"""A deterministic LAION-style corpus with real visual signal, in the formats users have.

Each image shows a coloured shape (the downstream task's class) on a textured background,
sometimes with a smaller distractor shape; captions range from precise ("a red star on a
striped background") through alt-text style ("star clipart") to web noise ("IMG_4821.jpg")
and a few wrong ones, as in LAION. Some pairs show no shape at all (pure texture).

Written under ``output`` (local path or ``s3://``):

- ``webdataset/NNNNN.tar``: img2dataset shards, members ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
  (``key``, ``url``, ``caption``, ``width``, ``height``, ``sha256``, ``status``)
- ``parquet/NNNNN.parquet``: the same pairs with image bytes in a ``jpg`` column
- ``laion-metadata/part-NNNNN.parquet``: LAION's metadata-only release (``URL``, ``TEXT``,
  ``WIDTH``, ``HEIGHT``, ``similarity``, ``punsafe``, ``pwatermark``, ``hash``)
- ``ground_truth.parquet``: per key the true shape, colour, background and caption kind
- ``eval/eval-00000.tar`` + ``eval/task.json``: a held-out labeled set for the shapes task
- with ``planted_eval_copies: N``, N corpus pairs are near-copies of eval images (re-encoded,
  resized or slightly cropped), as web crawls hold copies of benchmark images; ground truth
  names each one's eval key (``planted_from``) and transform, for decontamination tests
- ``images/KEY.jpg`` when ``write_images`` (for serving the URLs over HTTP in tests)
- ``preview.html`` and ``corpus.json`` (what was written, with counts)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from react_ray.config import CorpusConfig, GenerateConfig
from react_ray.formats import storage
from react_ray.report import image_grid_html

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "hexagon",
    "crescent",
    "diamond",
    "ring",
)
SYNONYMS = {
    "circle": ("circle", "round disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular sign", "pyramid shape"),
    "star": ("star", "five-pointed star", "starburst"),
    "cross": ("cross", "plus sign", "x-shaped cross"),
    "heart": ("heart", "love heart", "heart symbol"),
    "hexagon": ("hexagon", "honeycomb cell", "six-sided tile"),
    "crescent": ("crescent", "crescent moon", "moon shape"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "ring": ("ring", "donut shape", "hoop"),
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (240, 120, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (130, 80, 40),
}
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "noisy", "gradient")
CAPTION_KINDS = ("descriptive", "short", "alt-text", "noise", "wrong")
CAPTION_KIND_WEIGHTS = (0.35, 0.2, 0.25, 0.15, 0.05)
NO_SHAPE_FRACTION = 0.08
EVAL_SEED_OFFSET = 1_000_003  # the eval set never shares a random stream with the corpus
PLANT_TRANSFORMS = ("reencoded", "resized", "cropped")


@dataclass(frozen=True)
class Truth:
    shape: str | None  # None: a pure texture with no object
    color: str
    background: str


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * r * cos - y * r * sin, cy + x * r * sin + y * r * cos) for x, y in points]

    def regular(n: int, radius: float = 1.0, offset: float = 0.0) -> list[tuple[float, float]]:
        return [
            (
                radius * math.cos(offset + 2 * math.pi * k / n),
                radius * math.sin(offset + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=0)
    elif shape == "square":
        draw.polygon(polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), fill=255)
    elif shape == "diamond":
        draw.polygon(polygon([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon(regular(3, 1.0, -math.pi / 2)), fill=255)
    elif shape == "hexagon":
        draw.polygon(polygon(regular(6)), fill=255)
    elif shape == "star":
        outer, inner = regular(5, 1.0, -math.pi / 2), regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        draw.polygon(polygon([p for pair in zip(outer, inner) for p in pair]), fill=255)
    elif shape == "cross":
        t = 0.3
        draw.polygon(
            polygon(
                [
                    (-t, -1),
                    (t, -1),
                    (t, -t),
                    (1, -t),
                    (1, t),
                    (t, t),
                    (t, 1),
                    (-t, 1),
                    (-t, t),
                    (-1, t),
                    (-1, -t),
                    (-t, -t),
                ]
            ),
            fill=255,
        )
    elif shape == "heart":
        draw.ellipse((cx - r, cy - 0.75 * r, cx, cy + 0.1 * r), fill=255)
        draw.ellipse((cx, cy - 0.75 * r, cx + r, cy + 0.1 * r), fill=255)
        draw.polygon(
            [(cx - 0.97 * r, cy - 0.1 * r), (cx + 0.97 * r, cy - 0.1 * r), (cx, cy + r)], fill=255
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = rng.integers(60, 230, size=3)
    other = np.clip(base + rng.integers(-90, 90, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 12))
    if kind == "plain":
        pattern = np.zeros((size, size), bool)
    elif kind == "striped":
        pattern = ((xx + yy * int(rng.integers(0, 2))) // period) % 2 == 0
    elif kind == "dotted":
        pattern = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (
            period / 4
        ) ** 2
    elif kind == "checkered":
        pattern = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == "noisy":
        pattern = rng.random((size, size)) < 0.5
    else:  # gradient
        t = (xx if rng.random() < 0.5 else yy)[..., None] / max(size - 1, 1)
        return (base * (1 - t) + other * t).astype(np.uint8)
    return np.where(pattern[..., None], other, base).astype(np.uint8)


def render(
    rng: np.random.Generator, size: int, no_shape_fraction: float = NO_SHAPE_FRACTION
) -> tuple[Image.Image, Truth]:
    """One image and what is really in it; ``no_shape_fraction`` of them show only a texture."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    canvas = Image.fromarray(_background(rng, background, size))
    shape = None if rng.random() < no_shape_fraction else SHAPES[rng.integers(len(SHAPES))]
    objects = [] if shape is None else [(shape, color, rng.uniform(0.22, 0.4) * size)]
    if shape is not None and rng.random() < 0.25:  # a small distractor in another colour
        objects.append(
            (
                SHAPES[rng.integers(len(SHAPES))],
                list(COLORS)[rng.integers(len(COLORS))],
                0.12 * size,
            )
        )
    for i, (name, colour, radius) in enumerate(objects):
        margin = radius * 1.05
        cx, cy = (rng.uniform(margin, size - margin) for _ in range(2))
        if i:  # keep the distractor in a corner, away from the main object's centre
            cx, cy = (
                (margin if rng.random() < 0.5 else size - margin),
                (margin if rng.random() < 0.5 else size - margin),
            )
        jitter = np.clip(np.array(COLORS[colour]) + rng.integers(-25, 25, size=3), 0, 255)
        fill = Image.new("RGB", (size, size), tuple(int(c) for c in jitter))
        canvas.paste(
            fill, mask=_shape_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        )
    if rng.random() < 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
    return canvas, Truth(shape=shape, color=color, background=background)


def caption(rng: np.random.Generator, truth: Truth) -> tuple[str, str]:
    """A caption for ``truth`` and its kind (see ``CAPTION_KINDS``)."""
    if truth.shape is None:
        kind = "noise" if rng.random() < 0.3 else "descriptive"
        if kind == "descriptive":
            return f"abstract {truth.background} {truth.color} pattern", kind
    else:
        kind = CAPTION_KINDS[rng.choice(len(CAPTION_KINDS), p=CAPTION_KIND_WEIGHTS)]
    if kind == "noise":
        return str(
            rng.choice(
                [
                    f"IMG_{rng.integers(1000, 9999)}.jpg",
                    "untitled",
                    "click here for more",
                    f"product {rng.integers(100, 999)}",
                    "image",
                    "free shipping on all orders",
                ]
            )
        ), kind
    if kind == "wrong":  # label noise, as scraped alt-text has
        others = [s for s in SHAPES if s != truth.shape]
        truth = Truth(others[rng.integers(len(others))], truth.color, truth.background)
    name = SYNONYMS[truth.shape][rng.choice(3, p=(0.6, 0.25, 0.15))]
    if kind == "short":
        return f"{truth.color} {name}", kind
    if kind == "alt-text":
        pattern = rng.choice(
            [
                "{s} clipart",
                "stock photo of a {s}",
                "{s} icon vector",
                "{c} {s} sticker",
                "simple {s} logo",
                "{s} png",
            ]
        )
        return str(pattern).format(s=name, c=truth.color), kind
    pattern = rng.choice(
        [
            "a {c} {s} on a {b} background",
            "photo of a {c} {s}",
            "a {c} {s} against a {b} pattern",
            "{c} {s} drawn on {b} paper",
            "a picture of a {s}, {c}",
        ]
    )
    return str(pattern).format(s=name, c=truth.color, b=truth.background), kind


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            # mtime 0: identical bytes on every run
            info.size, info.mtime, info.mode = (
                len(data),
                0,
                0o644,
            )
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# LAION's per-pair scores, which img2dataset keeps with --save_additional_columns.
LAION_SCORES = ("similarity", "punsafe", "pwatermark")


def shard_samples(corpus: CorpusConfig, shard: int) -> list[dict]:
    """All pairs of one shard; the same (seed, shard) always gives the same bytes."""
    rng = np.random.default_rng([corpus.seed, shard])
    planted = planted_rows(corpus)
    samples = []
    for row in range(corpus.samples_per_shard):
        image, truth = render(rng, corpus.image_size, corpus.no_shape_fraction)
        text, kind = caption(rng, truth)
        key = f"{shard:05d}{row:04d}"
        jpg = _jpeg(image)
        eval_key, transform = planted.get((shard, row), (None, None))
        if eval_key is not None:  # drawn above all the same, so the other rows do not change
            jpg, truth, text = _planted_copy(corpus, eval_key, transform, key)
            image, kind = Image.open(io.BytesIO(jpg)), "planted"
        samples.append(
            {
                "key": key,
                "url": f"{corpus.url_base}/{key}.jpg",
                "caption": text,
                "jpg": jpg,
                "width": image.width,
                "height": image.height,
                "sha256": hashlib.sha256(jpg).hexdigest(),
                "similarity": float(rng.uniform(0.28, 0.42)),
                "punsafe": float(rng.beta(0.5, 12)),
                "pwatermark": float(rng.beta(0.8, 6)),
                "shape": truth.shape,
                "color": truth.color,
                "background": truth.background,
                "caption_kind": kind,
                "planted_from": eval_key,
                "plant_transform": transform,
            }
        )
    return samples


def write_shard(output: str, corpus: CorpusConfig, shard: int) -> list[dict]:
    samples = shard_samples(corpus, shard)
    if "webdataset" in corpus.formats:
        members = []
        for s in samples:
            meta = {
                k: s[k]
                for k in ("key", "url", "caption", "width", "height", "sha256", *LAION_SCORES)
            } | {"status": "success"}
            members += [
                (f"{s['key']}.jpg", s["jpg"]),
                (f"{s['key']}.txt", s["caption"].encode()),
                (f"{s['key']}.json", json.dumps(meta).encode()),
            ]
        storage.write_bytes_atomic(
            storage.join(output, "webdataset", f"{shard:05d}.tar"), _tar_bytes(members)
        )
    if "parquet" in corpus.formats:
        columns = ("key", "url", "caption", "jpg", "width", "height", "sha256", *LAION_SCORES)
        table = pa.table({c: [s[c] for s in samples] for c in columns})
        storage.write_bytes_atomic(
            storage.join(output, "parquet", f"{shard:05d}.parquet"), _parquet_bytes(table)
        )
    if "laion-metadata" in corpus.formats:
        renames = {
            "URL": "url",
            "TEXT": "caption",
            "WIDTH": "width",
            "HEIGHT": "height",
            "similarity": "similarity",
            "punsafe": "punsafe",
            "pwatermark": "pwatermark",
        }
        table = pa.table(
            {new: [s[old] for s in samples] for new, old in renames.items()}
            | {"hash": [int(s["sha256"][:15], 16) for s in samples]}
        )
        storage.write_bytes_atomic(
            storage.join(output, "laion-metadata", f"part-{shard:05d}.parquet"),
            _parquet_bytes(table),
        )
    if corpus.write_images:
        for s in samples:
            storage.write_bytes_atomic(storage.join(output, "images", f"{s['key']}.jpg"), s["jpg"])
    return samples


@cache
def eval_samples(seed: int, image_size: int, per_class: int) -> dict[str, tuple[bytes, Truth]]:
    """The held-out labeled images, key -> (jpeg, truth); every image shows one of SHAPES."""
    rng = np.random.default_rng([seed + EVAL_SEED_OFFSET])
    samples = {}
    for label, shape in enumerate(SHAPES):
        for i in range(per_class):
            image, truth = render(rng, image_size)
            while truth.shape != shape:
                image, truth = render(rng, image_size)
            samples[f"{label:03d}{i:05d}"] = (_jpeg(image), truth)
    return samples


def planted_rows(corpus: CorpusConfig) -> dict[tuple[int, int], tuple[str, str]]:
    """(shard, row) -> (eval key, transform) of each planted copy: spread over the eval set's
    classes and the corpus shards, from the end of each shard, cycling through the transforms."""
    if not corpus.planted_eval_copies:
        return {}
    keys = sorted(eval_samples(corpus.seed, corpus.image_size, corpus.eval_samples_per_class))
    per_shard = -(-corpus.planted_eval_copies // corpus.num_shards)
    if per_shard > corpus.samples_per_shard or corpus.planted_eval_copies > len(keys):
        raise ValueError(
            f"planted_eval_copies={corpus.planted_eval_copies}: more than the eval set "
            f"({len(keys)}) or the corpus shards can hold"
        )
    return {
        (j % corpus.num_shards, corpus.samples_per_shard - 1 - j // corpus.num_shards): (
            keys[j * len(keys) // corpus.planted_eval_copies],
            PLANT_TRANSFORMS[j % len(PLANT_TRANSFORMS)],
        )
        for j in range(corpus.planted_eval_copies)
    }


def _planted_copy(
    corpus: CorpusConfig, eval_key: str, transform: str, key: str
) -> tuple[bytes, Truth, str]:
    """A web copy of an eval image: re-encoded at low quality, resized, or cropped by a few
    percent."""
    jpg, truth = eval_samples(corpus.seed, corpus.image_size, corpus.eval_samples_per_class)[
        eval_key
    ]
    rng = np.random.default_rng([corpus.seed, int(key)])
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    size = image.width
    if transform == "resized":
        image = image.resize((round(size * 1.5), round(size * 1.5)), Image.BICUBIC)
    elif transform == "cropped":
        crop = round(size * 0.95)
        left, top = rng.integers(0, size - crop + 1, size=2)
        image = image.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=55 if transform == "reencoded" else 85)
    return buffer.getvalue(), truth, caption(rng, truth)[0]


def write_eval_set(output: str, corpus: CorpusConfig) -> int:
    """Held-out labeled images for the shapes task (every image shows one of SHAPES)."""
    members, count = [], 0
    for key, (jpg, truth) in eval_samples(
        corpus.seed, corpus.image_size, corpus.eval_samples_per_class
    ).items():
        label = SHAPES.index(truth.shape)
        members += [
            (f"{key}.jpg", jpg),
            (f"{key}.cls", str(label).encode()),
            (
                f"{key}.json",
                json.dumps({"key": key, "label": label, "classname": truth.shape}).encode(),
            ),
        ]
        count += 1
    storage.write_bytes_atomic(storage.join(output, "eval", "eval-00000.tar"), _tar_bytes(members))
    task = {"name": "shapes", "classnames": list(SHAPES), "num_samples": count}
    storage.write_text_atomic(storage.join(output, "eval", "task.json"), json.dumps(task, indent=2))
    return count


@dataclass
class CorpusSummary:
    output: str
    num_pairs: int
    num_eval: int
    formats: list[str]
    caption_kinds: dict[str, int]
    seconds: float

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.caption_kinds.items())
        return (
            f"corpus: {self.num_pairs} pairs in {', '.join(self.formats)} at {self.output} "
            f"({self.seconds:.1f}s); captions: {kinds}; eval set: {self.num_eval} labeled images"
        )


def generate_corpus(config: GenerateConfig, progress: bool = True) -> CorpusSummary:
    start = time.perf_counter()
    corpus, output = config.corpus, config.output
    storage.makedirs(output)
    truth_rows, preview = [], []
    for shard in tqdm(
        range(corpus.num_shards), desc="generate shards", unit="shard", disable=not progress
    ):
        for s in write_shard(output, corpus, shard):
            truth_rows.append(
                {
                    k: s[k]
                    for k in (
                        "key",
                        "shape",
                        "color",
                        "background",
                        "caption_kind",
                        "caption",
                        "planted_from",
                        "plant_transform",
                    )
                }
            )
            if len(preview) < 60:
                preview.append((s["jpg"], [s["caption"], f"truth: {s['shape'] or 'no shape'}"]))
    truth = pa.Table.from_pylist(truth_rows)
    storage.write_bytes_atomic(storage.join(output, "ground_truth.parquet"), _parquet_bytes(truth))
    num_eval = write_eval_set(output, corpus)
    storage.write_text_atomic(
        storage.join(output, "preview.html"),
        image_grid_html("Synthetic LAION-style corpus: first pairs", preview),
    )
    kinds = {
        k: int(v)
        for k, v in zip(*np.unique([r["caption_kind"] for r in truth_rows], return_counts=True))
    }
    summary = CorpusSummary(
        output, len(truth_rows), num_eval, list(corpus.formats), kinds, time.perf_counter() - start
    )
    storage.write_text_atomic(
        storage.join(output, "corpus.json"),
        json.dumps({"config": config.model_dump(mode="json")} | summary.__dict__, indent=2),
    )
    return summary

"""The model step: decoded batches -> image and caption embeddings in one pass. No Ray here.

``ClipEmbedder`` is a callable class (model loaded once in ``__init__``), so Ray Data runs it
on an actor pool; called directly it is plain PyTorch. It writes each batch's embeddings
as parts of their shards (``formats.shard_writer``) and returns only what it wrote, typed
(``PartWritten``), so embeddings never travel through the driver. ``decode_and_tokenize``
prepares its batches (in CPU tasks, or in the actor: ``decode_in_actor``); it lives here because
tokenizing imports open_clip and torch, which ``decode`` (also run by download tasks and Serve
replicas) does not need.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from react_ray.config import ModelConfig
from react_ray.formats import shard_writer
from react_ray.formats.decode import decode_batch
from react_ray.formats.embedding_set import embedding_table, shard_name, write_parquet
from react_ray.formats.shard_writer import PartWritten
from react_ray.models import autocast, build_model, get_tokenizer


def node_id() -> str:
    """The Ray node this runs on ("local" outside Ray): the shard stats list who did the work."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def decode_and_tokenize(
    batch: dict,
    image_size: int,
    max_pixels: int,
    model_name: str,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> dict:
    """decode_batch plus caption tokens, so the model actor (on a GPU, its one Python thread feeds
    the device) only runs the model; each row is tagged with the node that prepared it (the shard
    stats list the nodes)."""
    out = decode_batch(batch, image_size, max_pixels, resize_mode, interpolation)
    tokens = get_tokenizer(model_name)([str(c) for c in out["caption"]]).numpy()
    return out | {
        "tokens": tokens,
        "decode_node": np.full(len(out["id"]), node_id(), object),
    }


class ClipEmbedder:
    def __init__(
        self,
        model: dict,
        precision: str,
        device: str,
        output: str,
        run_id: str,
        threads: int | None = None,
        prepare: dict | None = None,
    ):
        # CPU intra-op threads (Ray pins them to int(num_cpus); an actor with 1.5 CPUs should use
        # 2).
        # libgomp keeps a thread team per calling thread and, once a process has more team threads
        # than CPUs, stops spinning at barriers, so every op waits for wake-ups (15% slower,
        # measured). Ray Data calls this object from another thread than the one building it: build
        # with one thread, and start the team on the thread that runs the model (``embed``).
        # prepare: decode_and_tokenize's arguments, to run it here
        self.threads, self.prepare = (
            threads,
            prepare,
        )
        if threads:
            torch.set_num_threads(1)
        self.clip = build_model(ModelConfig.model_validate(model), device=device)
        self.precision, self.output, self.run_id = precision, output, run_id
        self.device = torch.device(device)
        self.node = node_id()
        cfg = self.clip.model.visual.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)

    def embed(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) + N tokenized captions -> (img_emb, txt_emb), float16,
        L2-normalised."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        images = (
            torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        )
        images = (images / 255.0 - self.mean) / self.std
        with torch.inference_mode(), autocast(self.device, self.precision):
            img = self.clip.model.encode_image(images, normalize=True)
            txt = self.clip.model.encode_text(
                torch.as_tensor(tokens).to(self.device), normalize=True
            )
        return img.float().cpu().numpy().astype(np.float16), txt.float().cpu().numpy().astype(
            np.float16
        )

    def __call__(self, batch: dict) -> dict:
        """A batch of records (several shards' maybe) -> one part file per shard, and one
        ``PartWritten`` per shard (the column ``part``, encoded) saying what became of its rows."""
        start = time.perf_counter()
        if self.prepare:
            batch = decode_and_tokenize(batch, **self.prepare)
        good = np.array([not e for e in batch["error"]], bool)
        img_emb = txt_emb = None
        if good.any():
            img_emb, txt_emb = self.embed(batch["pixels"][good], batch["tokens"][good])
        good_index = np.cumsum(good) - 1  # row i's position among the embedded rows
        shards = np.asarray(batch["shard"]).astype(np.int64)
        reports = []
        for shard in sorted(set(shards.tolist())):
            rows = np.flatnonzero(shards == shard)
            ok, bad = rows[good[rows]], rows[~good[rows]]
            part = ""
            if len(ok):
                part = shard_writer.part_uri(
                    self.output, shard_name(shard), self.run_id, int(batch["id"][ok[0]]), ".parquet"
                )
                pick = good_index[ok]
                write_parquet(
                    part,
                    embedding_table(
                        batch["id"][ok],
                        batch["key"][ok],
                        [str(u) or None for u in batch["url"][ok]],
                        batch["caption"][ok],
                        img_emb[pick],
                        txt_emb[pick],
                        batch["meta"][ok],
                    ),
                )
            decoders = batch["decode_node"][rows] if "decode_node" in batch else []
            reports.append(
                PartWritten(
                    shard=shard,
                    rows=len(rows),
                    written=len(ok),
                    part=part,
                    skipped=[
                        {
                            "id": int(batch["id"][i]),
                            "key": str(batch["key"][i]),
                            "reason": str(batch["error"][i]),
                            "message": str(batch["message"][i]),
                        }
                        for i in bad
                    ],
                    seconds=time.perf_counter() - start,
                    nodes={"decode": sorted({str(n) for n in decoders}), "embed": [self.node]},
                ).encode()
            )
        return {"part": np.array(reports, dtype=object)}

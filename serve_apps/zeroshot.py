"""Ray Serve zero-shot classification app, several customized models side by side.

POST ``/v1/classify`` with base64 images and either class names (+ templates) or a named task;
the model is chosen by the ``serve_multiplexed_model_id`` header or the ``model`` field. Models
load on demand from local or ``s3://`` checkpoints through Serve's model multiplexing, at most
``REACT_RAY_MODELS_PER_REPLICA`` (default 3) per replica, least recently used leaving first;
prompt-ensemble classifiers are cached per (model, classes, templates).
"""

import asyncio
import os
import time
from collections import OrderedDict

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from react_ray.config import ZeroShotAppConfig
from react_ray.evaluate.zeroshot import classify_pixels, zero_shot_classifier
from react_ray.retrieve.task import is_plain_template, load_task, shipped
from serve_apps.common import Guard, decode_base64_image, guard_requests, read_tokens, within

# Fixed when the class is defined (Serve's decorator argument), hence an environment variable.
MODELS_PER_REPLICA = int(os.environ.get("REACT_RAY_MODELS_PER_REPLICA", "3"))


class ClassifyRequest(BaseModel):
    images: list[str] = Field(min_length=1, description="base64 image bytes")
    classnames: list[str] | None = Field(default=None, min_length=1)
    templates: list[str] | None = Field(
        default=None, min_length=1, description="default: the 80 ImageNet templates"
    )
    task: str | None = Field(
        default=None, description="a named task of the app (its classes and templates)"
    )
    top_k: int = Field(default=5, ge=1)
    model: str | None = None


class Prediction(BaseModel):
    labels: list[str]
    scores: list[float]  # softmax probabilities of the top-k labels


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


app = FastAPI(title="react-ray zero-shot", version="1")
guard_requests(app)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class ZeroShotAPI:
    def __init__(self, config: dict, tokens: dict):
        self.config = ZeroShotAppConfig.model_validate(config)
        app.state.guard = Guard(
            self.config.max_request_bytes, cors_origins=self.config.access.cors_origins, **tokens
        )
        self.classifiers: OrderedDict = OrderedDict()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str):
        from react_ray.models import build_model

        return await asyncio.to_thread(build_model, self.config.models[model_id])

    def _classes(self, request: ClassifyRequest) -> tuple[list[str], list[str]]:
        if (request.task is None) == (request.classnames is None):
            raise HTTPException(422, "give exactly one of classnames or task")
        if request.task is not None:
            if request.task not in self.config.tasks:
                raise HTTPException(
                    404,
                    f"unknown task {request.task!r}; known: {', '.join(sorted(self.config.tasks))}",
                )
            task = load_task(self.config.tasks[request.task])
            return task.classes, task.template_list
        templates = request.templates or shipped("templates")["imagenet80"]
        if len(request.classnames) > self.config.max_classes:
            raise HTTPException(
                413, f"{len(request.classnames)} classes; the limit is {self.config.max_classes}"
            )
        if len(templates) > self.config.max_templates:
            raise HTTPException(
                413, f"{len(templates)} templates; the limit is {self.config.max_templates}"
            )
        limit = self.config.max_text_chars
        for what, texts in (("classnames", request.classnames), ("templates", templates)):
            if (long := next((i for i, t in enumerate(texts) if len(t) > limit), None)) is not None:
                raise HTTPException(
                    422, f"{what}[{long}]: {len(texts[long]):,} characters; the limit is {limit}"
                )
        bad = [t for t in templates if not is_plain_template(t)]
        if bad:
            raise HTTPException(
                422,
                f"templates need exactly one '{{}}' for the class name and no other braces; "
                f"these do not: {[t[:80] for t in bad[:3]]}",
            )
        return request.classnames, templates

    def _classifier(
        self, model_id: str, clip, classnames: list[str], templates: list[str], deadline: float
    ) -> torch.Tensor:
        key = (model_id, tuple(classnames), tuple(templates))
        if key in self.classifiers:
            self.classifiers.move_to_end(key)
        else:  # stops at the deadline: no work goes on for a request already answered 504
            self.classifiers[key] = zero_shot_classifier(clip, classnames, templates, deadline)
            if len(self.classifiers) > self.config.max_cached_classifiers:
                self.classifiers.popitem(last=False)
        return self.classifiers[key]

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        # The proxy turns the serve_multiplexed_model_id header into the request context (and
        # routes to a replica that already holds that model).
        model_id = request.model or serve.get_multiplexed_model_id() or self.config.default_model
        if model_id is None:
            raise HTTPException(
                422, "no model: set the 'model' field or the serve_multiplexed_model_id header"
            )
        if model_id not in self.config.models:
            raise HTTPException(
                404, f"unknown model {model_id!r}; known: {', '.join(sorted(self.config.models))}"
            )
        if len(request.images) > self.config.max_images:
            raise HTTPException(
                413, f"{len(request.images)} images; the limit is {self.config.max_images}"
            )
        classnames, templates = self._classes(request)
        return await within(
            self.config.request_timeout_s,
            self._classify(model_id, request, classnames, templates),
            "classification",
        )

    async def _classify(self, model_id, request, classnames, templates) -> ClassifyResponse:
        deadline = time.monotonic() + self.config.request_timeout_s
        clip = await self.get_model(model_id)
        pixels = await asyncio.to_thread(
            lambda: [  # PIL work off the event loop
                decode_base64_image(
                    image, f"images[{i}]", clip.decode_args, self.config.max_image_pixels
                )
                for i, image in enumerate(request.images)
            ]
        )

        def run():
            weights = self._classifier(model_id, clip, classnames, templates, deadline)
            return classify_pixels(clip, pixels, weights)

        probabilities = await asyncio.to_thread(run)
        k = min(request.top_k, len(classnames))
        predictions = []
        for row in probabilities:
            top = np.argsort(-row)[:k]
            predictions.append(
                Prediction(labels=[classnames[i] for i in top], scores=[float(row[i]) for i in top])
            )
        return ClassifyResponse(model=model_id, predictions=predictions)

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {
            "models": sorted(self.config.models),
            "tasks": sorted(self.config.tasks),
            "default_model": self.config.default_model,
        }

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        return {"status": "ready", "models": len(self.config.models)}


def build_app(args: dict) -> serve.Application:
    """``serve deploy`` / ``serve.run`` entry: ``import_path: serve_apps.zeroshot:build_app``."""
    config = ZeroShotAppConfig.model_validate(args)
    return ZeroShotAPI.options(ray_actor_options=config.replica.ray_options()).bind(
        config.model_dump(mode="json"), read_tokens(config.access)
    )

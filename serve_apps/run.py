"""``react-ray serve``: both apps on a local Serve instance, until interrupted.

On a cluster, deploy ``serve_apps/serve_config.yaml`` with ``serve deploy`` (or a RayService)
instead; it names the same ``build_app`` entry points.
"""

from __future__ import annotations

import os
import time

from react_ray.config import INGRESS_ENV, ServeConfig
from react_ray.ray_utils import connect

ROUTES = {"retrieval": "/", "zeroshot": "/zeroshot"}


def start_apps(config: ServeConfig) -> dict[str, str]:
    """Deploy the configured apps; -> {app name: base URL}."""
    from ray import serve

    from serve_apps import retrieval, zeroshot

    if config.ingress in INGRESS_ENV:  # read by Serve's controller and replicas when they start
        os.environ[INGRESS_ENV[config.ingress]] = "1"
    connect(config.ray_address)
    serve.start(http_options={"host": config.host, "port": config.port})
    builders = {"retrieval": retrieval.build_app, "zeroshot": zeroshot.build_app}
    urls = {}
    for name, builder in builders.items():
        app_config = getattr(config, name)
        if app_config is not None:
            serve.run(
                builder(app_config.model_dump(mode="json")), name=name, route_prefix=ROUTES[name]
            )
            urls[name] = f"http://{config.host}:{config.port}{ROUTES[name].rstrip('/')}"
    return urls


def run_serve(config: ServeConfig) -> int:
    """run the retrieval and zero-shot Serve apps locally

    Registered as the ``serve`` stage of ``react-ray`` (pyproject's ``react_ray.stages`` entry
    points)."""
    for name, url in start_apps(config).items():
        print(f"serve: {name} at {url}/ (OpenAPI docs: {url}/docs, health: {url}/healthz)")
    print("serve: running; Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0

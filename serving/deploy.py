"""Deploying the mixed-policy app: from a Ray Serve config file or from a :class:`ServeConfig`.

A Moray serve file *is* a Ray Serve config file (validated with ``ServeDeploySchema``), so the
same file works with ``moray serve --config serve.yaml``, ``serve run serve.yaml`` and
``serve deploy serve.yaml``. HTTP binds 127.0.0.1 unless the file says otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import yaml

from serving.config import ServeConfig
from trainers.core.config import to_dict
from trainers.core.runtime import init_ray

log = logging.getLogger(__name__)

APP_NAME = "moray"
IMPORT_PATH = "serving.app:build_app"
DEPLOYMENT = "MixedPolicy"


def serve_file(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> Dict[str, Any]:
    """The Ray Serve config document for ``cfg`` (deployment options written out, so they can be
    edited in the file)."""
    cfg.validate()
    options = cfg.deployment_options()
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": to_dict(cfg), "deployments": [dict(name=DEPLOYMENT, **options)]}],
    }


def load_serve_file(path: str) -> Dict[str, Any]:
    """Read and validate a Serve config file; every application must be Moray's."""
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    try:
        ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    except Exception as e:  # pydantic's message names the field
        raise ValueError(f"{path} is not a valid Ray Serve config: {e}") from None
    for app in doc["applications"]:
        if app.get("import_path") != IMPORT_PATH:
            raise ValueError(f"{path}: application {app.get('name')!r} imports {app.get('import_path')!r}; "
                             f"moray serve runs {IMPORT_PATH} (use `serve run` for other apps)")
    return doc


def run_serve_file(doc: Dict[str, Any], address: Optional[str] = None) -> str:
    """Start Serve on the local (or given) Ray and deploy every application of ``doc``; returns the URL."""
    from ray import serve

    from serving.app import bind_app  # imports Ray Serve: only when deploying

    http = dict(doc.get("http_options") or {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    apps = []  # bound (policies checked) before Ray starts
    for app in doc["applications"]:
        overrides = {k: v for d in app.get("deployments") or [] if d.get("name") == DEPLOYMENT
                     for k, v in d.items() if k != "name"}
        apps.append((bind_app(app.get("args") or {}, overrides), app.get("name", APP_NAME), app.get("route_prefix", "/")))
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    for bound, name, prefix in apps:
        serve.run(bound, name=name, route_prefix=prefix)
    url = f"http://{host}:{port}"
    log.info("serving %s at %s (OpenAI API under /v1)", [a.get("name") for a in doc["applications"]], url)
    return url


def write_serve_file(doc: Dict[str, Any], path: str) -> str:
    with open(path, "w") as f:
        f.write("# Ray Serve config for Moray's mixed-policy app: `moray serve --config` this file,\n"
                "# or `serve run` / `serve deploy` it. args: see `moray config serve`.\n")
        yaml.safe_dump(doc, f, sort_keys=False)
    return path

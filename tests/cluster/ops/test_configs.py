"""The cluster configs in cluster/ops/configs/: the launcher YAML against Ray's own cluster-config
schema, the Serve config inside the RayService against Ray Serve's ServeDeploySchema and Moray's
ServeConfig, the KubeRay objects against the ray.io/v1 fields KubeRay reads, and the job's
entrypoint against the moray command line."""

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from cluster.cli.parser import build_parser
from serving.config import ServeConfig
from serving.deploy import DEPLOYMENT, IMPORT_PATH
from trainers.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "cluster" / "ops" / "configs"

# ray.io/v1 spec fields (KubeRay's RayJob / RayService / RayCluster CRDs): anything else is a typo
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "jobId", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "rayClusterSpec", "clusterSelector", "submitterPodTemplate",
               "submitterConfig", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend",
               "submissionMode", "backoffLimit", "managedBy", "deletionStrategy", "metadata"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterSpec", "upgradeStrategy", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "serveService"}
CLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy"}
GROUP_SPEC = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
              "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds", "serviceType", "headService",
              "enableIngress"}


def _problems_of_cluster_spec(spec, where):
    out = [f"{where}.{k}: not a RayCluster spec field" for k in spec if k not in CLUSTER_SPEC]
    if spec.get("rayVersion") != ray.__version__:
        out.append(f"{where}.rayVersion {spec.get('rayVersion')!r} is not the Ray Moray runs ({ray.__version__})")
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for name, g in groups:
        out += [f"{where}.{name}.{k}: not a group field" for k in g if k not in GROUP_SPEC]
        params = g.get("rayStartParams")
        if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
            out.append(f"{where}.{name}.rayStartParams must map to strings (KubeRay rejects other types)")
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers or any(not c.get("name") or not c.get("image") for c in containers):
            out.append(f"{where}.{name}: template.spec.containers need a name and an image")
        if name != "headGroupSpec":
            if not g.get("groupName"):
                out.append(f"{where}.{name}: groupName is required")
            counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            if any(not isinstance(c, int) for c in counts) or not counts[0] <= counts[1] <= counts[2]:
                out.append(f"{where}.{name}: need integers minReplicas <= replicas <= maxReplicas, got {counts}")
    return out


def kuberay_problems(obj):
    """What KubeRay would reject or silently ignore in a ray.io/v1 RayJob or RayService."""
    out = []
    if obj.get("apiVersion") != "ray.io/v1":
        out.append(f"apiVersion must be ray.io/v1, got {obj.get('apiVersion')!r}")
    name = (obj.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,45}[a-z0-9])?", name):
        out.append(f"metadata.name {name!r} is not a short DNS-1123 label")
    spec, kind = obj.get("spec") or {}, obj.get("kind")
    known = {"RayJob": RAYJOB_SPEC, "RayService": RAYSERVICE_SPEC}.get(kind)
    if known is None:
        return out + [f"kind must be RayJob or RayService, got {kind!r}"]
    out += [f"spec.{k}: not a {kind} spec field" for k in spec if k not in known]
    if kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            out.append("spec.entrypoint must be a command line")
        if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            out.append("spec.runtimeEnvYAML must be a YAML mapping")
    else:
        if not isinstance(spec.get("serveConfigV2"), str):
            out.append("spec.serveConfigV2 must be a YAML string")
    return out + _problems_of_cluster_spec(spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec")


def _load(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def test_launcher_config_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("gpu-cluster.yaml")
    # as `ray up` does: Ray's defaults filled in, then its jsonschema (ray-schema.json) and checks
    validate_config(prepare_config(cfg))
    bad = {**cfg, "available_node_types": {**cfg["available_node_types"], "gpu_workers": {
        **cfg["available_node_types"]["gpu_workers"], "max_worker": 8}}}  # a typo Ray must refuse
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=disabled" not in json.dumps(cfg)
    assert cfg["available_node_types"]["gpu_workers"]["resources"]["GPU"] == 1


def test_rayjob_fields_and_its_moray_command_line():

    job = _load("kuberay-rayjob.yaml")
    assert kuberay_problems(job) == []
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert (args.command, args.method, args.objective, args.workers, args.use_gpu) == ("train", "dpo", "sentiment", 2, True)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = sum(int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * w["replicas"]
               for w in [workers])
    assert gpus >= args.workers  # one GPU per Ray Train worker
    typo = {**job, "spec": {**job["spec"], "entrypiont": "x"}}
    assert kuberay_problems(typo) == ["spec.entrypiont: not a RayJob spec field"]


def test_rayservice_embeds_a_valid_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema


    svc = _load("kuberay-rayservice.yaml")
    assert kuberay_problems(svc) == []
    doc = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["import_path"] == IMPORT_PATH and app["deployments"][0]["name"] == DEPLOYMENT
    # Moray's own config: every key known and typed; validated with the policies made local
    args = dict(app["args"])
    for k in args["policies"]:
        (tmp_path / k).mkdir()
    args["policies"] = {k: str(tmp_path / k) for k in args["policies"]}
    (tmp_path / "w.json").write_text(json.dumps({"weights": {"sentiment": 0.4, "conciseness": 0.6}}))
    args["mpo_weights"] = str(tmp_path / "w.json")
    cfg = load_config(ServeConfig, overrides=args).validate()
    opts = cfg.deployment_options()
    assert opts["autoscaling_config"] == app["deployments"][0]["autoscaling_config"]
    assert opts["ray_actor_options"]["num_gpus"] == 1.0 and cfg.api_key_env == "MORAY_API_KEY"
    env = svc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "MORAY_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in env)
    max_replicas = app["deployments"][0]["autoscaling_config"]["max_replicas"]
    assert svc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] >= max_replicas  # a GPU each

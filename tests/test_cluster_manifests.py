"""cluster/: KubeRay manifests validated strictly against the KubeRay v1.7.0 CRDs, the AWS launcher
YAML against Ray's own schema, versions pinned to pyproject's Ray, and every entrypoint, preset and
Serve import path resolving to real code in this repository."""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from react_ray.cli import STAGES
from react_ray.config import RetrievalAppConfig, ZeroShotAppConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUBERAY_FILES = ["raycluster.yaml", "rayjobs.yaml", "rayservice.yaml"]
RAY_PIN = (
    re.search(r'"ray\[[^\]]*\]==([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    .group(1)
    .rstrip(".")
)


def strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as kubectl --validate=strict reads it: unknown fields are errors."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    schema = strict(
        next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    )
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def documents() -> list[tuple[str, dict]]:
    return [
        (f"{name}#{i}", doc)
        for name in KUBERAY_FILES
        for i, doc in enumerate(yaml.safe_load_all((CLUSTER / name).read_text()))
        if doc
    ]


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason="the KubeRay CRDs ship in ../shared/schemas")
@pytest.mark.parametrize("where,doc", documents(), ids=[w for w, _ in documents()])
def test_kuberay_manifests_validate_strictly_against_the_v1_7_crds(where, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    crd_validator(doc["kind"]).validate(doc)


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason="the KubeRay CRDs ship in ../shared/schemas")
def test_strict_validation_rejects_unknown_and_mistyped_fields():
    cluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    validator = crd_validator("RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][1]["maxReplica"] = 64  # not maxReplicas
    with pytest.raises(jsonschema.ValidationError, match="'maxReplica' was unexpected"):
        validator.validate(typo)
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        validator.validate(wrong_type)


def cluster_specs() -> list[dict]:
    out = []
    for _, doc in documents():
        spec = doc["spec"]
        out += (
            [spec]
            if doc["kind"] == "RayCluster"
            else [spec["rayClusterConfig"]]
            if "rayClusterConfig" in spec
            else []
        )
    return out


def images() -> list[str]:
    found = []
    for spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            found += [c["image"] for c in group["template"]["spec"]["containers"]]
    found.append(yaml.safe_load((CLUSTER / "aws-launcher.yaml").read_text())["docker"]["image"])
    return found


def test_versions_are_pinned_to_pyprojects_ray():
    assert RAY_PIN.startswith("2.")
    assert all(spec["rayVersion"].startswith(RAY_PIN) for spec in cluster_specs())
    assert {spec["rayVersion"] for spec in cluster_specs()} == {f"{RAY_PIN}.0"}
    assert all(f"ray{RAY_PIN}.0" in image and ":latest" not in image for image in images())
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base == f"rayproject/ray:{RAY_PIN}.0-py311-gpu"


def test_the_image_sets_the_raylet_settings_of_local_rays():
    from react_ray.ray_utils import RAYLET_ENV

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert dict(re.findall(r"^ENV (RAY_\w+)=(\S+)$", dockerfile, re.MULTILINE)) == RAYLET_ENV


def test_autoscaling_gpu_group_and_cpu_decode_group():
    cluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and limits["nvidia.com/gpu"] == "1"
    assert "cpu_node" in groups["cpu-decode"]["resources"]
    embed = load_config(
        STAGES["embed"].config_type, str(ROOT / "jobs/presets/embed_laion_gpu.yaml")
    )
    # decode lands on the CPU group
    assert set(embed.decode.custom) <= set(groups["cpu-decode"]["resources"])
    assert embed.pool.num_gpus == 1 and embed.pool.max_actors <= gpu["maxReplicas"]


def test_no_inline_secrets():
    secret = re.compile(
        r"(aws_secret_access_key|AWS_SECRET|password|token)\s*[:=]\s*\S", re.IGNORECASE
    )
    for path in CLUSTER.iterdir():
        assert not secret.search(path.read_text()), f"{path.name} holds a credential"


def test_every_rayjob_entrypoint_runs_a_real_job_with_a_valid_config():
    jobs = [doc for _, doc in documents() if doc["kind"] == "RayJob"]
    stages = set()
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and argv[2] == "--config", argv
        script, config, overrides = ROOT / argv[1], ROOT / argv[3], argv[4:]
        stage = script.stem
        assert script.is_file() and config.is_file() and stage in STAGES
        load_config(STAGES[stage].config_type, str(config), overrides)
        stages.add(stage)
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "react-ray"}
    assert stages == {"embed", "index", "retrieve", "materialize", "train", "evaluate"}


def serve_configs() -> list[tuple[str, dict]]:
    service = next(doc for _, doc in documents() if doc["kind"] == "RayService")
    return [
        (
            "serve_apps/serve_config.yaml",
            yaml.safe_load((ROOT / "serve_apps" / "serve_config.yaml").read_text()),
        ),
        ("cluster/rayservice.yaml", yaml.safe_load(service["spec"]["serveConfigV2"])),
    ]


def test_rayservice_serves_exactly_serve_config_yaml():
    (_, plain), (_, service) = serve_configs()
    assert service == plain


@pytest.mark.parametrize("where,data", serve_configs(), ids=[w for w, _ in serve_configs()])
def test_serve_configs_validate_with_serve_schema_and_our_app_configs(where, data):
    """Ray Serve's own schema, import paths that resolve, app args our configs accept."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(data)
    arg_types = {
        "serve_apps.retrieval:build_app": RetrievalAppConfig,
        "serve_apps.zeroshot:build_app": ZeroShotAppConfig,
    }
    for app in schema.applications:
        module, attribute = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        args = arg_types[app.import_path].model_validate(app.args)
        names = {d.name for d in app.deployments}
        if app.import_path.startswith("serve_apps.retrieval"):
            assert names == {
                "RetrievalAPI",
                "QueryEncoder",
                *(f"IndexShardGroup{g}" for g in range(args.shard_groups)),
            }
        else:
            assert names == {"ZeroShotAPI"}


def test_aws_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-launcher.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` checks before touching a cloud
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_embed_spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert (
        types["gpu_embed_spot"]["resources"]["GPU"] == 1
        and types["gpu_train"]["resources"]["GPU"] == 8
    )
    assert types["cpu_decode"]["resources"]["cpu_node"] > 0 and types["head"]["resources"] == {
        "CPU": 0
    }
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_embed_spot"]["min_wokers"] = 0
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def test_ray_token_auth_separate_service_accounts_and_no_ray_client_port():
    """Batch pods may write the bucket (react-ray-batch), Serve pods only read it (react-ray-serve);
    both clusters use Ray's token authentication; the Ray Client port is not exposed."""
    batch = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())["spec"]
    service = next(doc for _, doc in documents() if doc["kind"] == "RayService")["spec"][
        "rayClusterConfig"
    ]
    for spec, account in ((batch, "react-ray-batch"), (service, "react-ray-serve")):
        assert spec["authOptions"] == {"mode": "token"}
        assert {t["spec"]["serviceAccountName"] for t in _pod_templates(spec)} == {account}
        ports = [
            p["containerPort"]
            for t in _pod_templates(spec)
            for c in t["spec"]["containers"]
            for p in c.get("ports", [])
        ]
        assert 10001 not in ports
    env = {
        e["name"]: e for e in service["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    admin = env["REACT_RAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert admin == {"name": "react-ray-serve-tokens", "key": "admin-token"}
    assert (
        RetrievalAppConfig(indices={"x": {"image": "/x"}}).access.admin_token_env
        == "REACT_RAY_ADMIN_TOKEN"
    )


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_cover_every_pod_and_keep_the_metadata_service_out_of_serve():
    policies = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all((CLUSTER / "networkpolicy.yaml").read_text())
    }
    assert all(
        p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy"
        for p in policies.values()
    )
    batch = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())["spec"]
    service = next(doc for _, doc in documents() if doc["kind"] == "RayService")["spec"][
        "rayClusterConfig"
    ]
    for spec, name in ((batch, "react-ray-batch"), (service, "react-ray-serve")):
        policy = policies[name]["spec"]
        for template in _pod_templates(spec):
            labels = template["metadata"]["labels"]
            assert _selects(policy["podSelector"], labels)  # every pod is under its policy
            assert not _selects(
                policies[({"react-ray-batch", "react-ray-serve"} - {name}).pop()]["spec"][
                    "podSelector"
                ],
                labels,
            )
    # Outside the cluster's own pods: the batch head's dashboard (job submission), Serve's HTTP
    # port.
    open_ports = {
        name: [
            p["port"]
            for rule in policies[name]["spec"]["ingress"]
            if "ports" in rule
            for p in rule["ports"]
        ]
        for name in policies
    }
    assert open_ports == {"react-ray-batch": [8265], "react-ray-serve": [8000]}
    serve_egress = policies["react-ray-serve"]["spec"]["egress"]
    assert serve_egress == [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}]}
    ]


def test_launcher_nodes_require_imdsv2_and_keep_the_dashboard_local():
    raw = yaml.safe_load((CLUSTER / "aws-launcher.yaml").read_text())
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["MetadataOptions"] == {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
        }, name
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])

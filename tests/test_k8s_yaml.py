"""The Kubernetes example in deploy/k8s: well-formed, and wired the way
docs/deployment.md says (gRPC health probes, a GPU per worker, passwords only
from Secrets). Offline: PyYAML, a JSON schema of the fields that matter here,
and the Kubernetes API schemas bundled in kubernetes-validate.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
GRPC_PORT = 50051
SECRETISH = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|AUTH", re.IGNORECASE)
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
    "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
    # A password, token or other secret only ever comes from a Secret.
    "if": {"properties": {"name": {"pattern": SECRETISH.pattern.join(["(?i)(", ")"])}}},
    "then": {
        "not": {"required": ["value"]},
        "properties": {
            "valueFrom": {
                "type": "object",
                "required": ["secretKeyRef"],
                "properties": {
                    "secretKeyRef": {"type": "object", "required": ["name", "key"]},
                },
            }
        },
    },
}
# Readiness: grpc.health.v1 for "" (this server can talk to Redis).
READINESS = {
    "type": "object",
    "required": ["grpc"],
    "properties": {
        "grpc": {
            "type": "object",
            "required": ["port"],
            "properties": {"port": {"const": GRPC_PORT}, "service": {"const": ""}},
        }
    },
}
# Liveness (and start-up): never anything that follows Redis or the workers,
# so a Redis outage restarts no server: a TCP check of the gRPC port.
LIVENESS = {
    "type": "object",
    "required": ["tcpSocket"],
    "not": {"anyOf": [{"required": ["grpc"]}, {"required": ["exec"]}]},
    "properties": {
        "tcpSocket": {
            "type": "object",
            "required": ["port"],
            "properties": {"port": {"enum": ["grpc", GRPC_PORT]}},
        }
    },
}
# Workers: the Prometheus endpoint on the metrics port.
METRICS_PROBE = {
    "type": "object",
    "required": ["httpGet"],
    "properties": {
        "httpGet": {
            "type": "object",
            "required": ["path", "port"],
            "properties": {"path": {"const": "/metrics"}, "port": {"enum": ["metrics", 9100]}},
        }
    },
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image", "args", "ports"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL},
        # A pinned tag, never the moving :latest.
        "image": {
            "type": "string",
            "pattern": r"^[^\s:]+(:[A-Za-z0-9_][A-Za-z0-9_.-]*)$",
            "not": {"pattern": ":latest$"},
        },
        "args": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "ports": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "containerPort"],
                "properties": {
                    "name": {"type": "string", "maxLength": 15},
                    "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
            },
        },
        "env": {"type": "array", "items": ENV_VAR},
    },
}
OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"type": "string", "minLength": 1},
        "kind": {
            "type": "string",
            "enum": ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"],
        },
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}},
        },
    },
    "allOf": [
        {
            "if": {"properties": {"kind": {"const": "Deployment"}}},
            "then": {
                "properties": {
                    "apiVersion": {"const": "apps/v1"},
                    "spec": {
                        "type": "object",
                        "required": ["selector", "template"],
                        "properties": {
                            "template": {
                                "type": "object",
                                "required": ["spec"],
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "required": ["containers"],
                                        "properties": {
                                            "containers": {
                                                "type": "array",
                                                "minItems": 1,
                                                "items": CONTAINER,
                                            }
                                        },
                                    }
                                },
                            }
                        },
                    },
                },
                "required": ["spec"],
            },
        }
    ],
}
SERVER = {
    "type": "object",
    "required": ["readinessProbe", "livenessProbe"],
    "properties": {
        "readinessProbe": READINESS,
        "livenessProbe": LIVENESS,
        "startupProbe": LIVENESS,
    },
}
WORKER = {
    "type": "object",
    "required": ["resources", "startupProbe", "livenessProbe"],
    "properties": {
        "startupProbe": METRICS_PROBE,
        "livenessProbe": METRICS_PROBE,
        "resources": {
            "type": "object",
            "required": ["limits", "requests"],
            "properties": {
                "limits": {
                    "required": ["nvidia.com/gpu"],
                    "properties": {"nvidia.com/gpu": {"const": 1}},
                },
                "requests": {
                    "required": ["nvidia.com/gpu"],
                    "properties": {"nvidia.com/gpu": {"const": 1}},
                },
            },
        },
    },
}


def load_all() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return load_all()


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (only,) = pod(deployment)["containers"]
    return only


def test_every_object_matches_the_schema(docs):
    assert {p.name for p in MANIFESTS} >= {"configmap.yaml", "server.yaml", "worker.yaml"}
    for doc in docs:
        jsonschema.validate(doc, OBJECT)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


def test_manifests_match_the_kubernetes_api_schemas(docs):
    """Strict validation (unknown fields rejected) against the bundled OpenAPI schemas."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.29", strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_server_probes_grpc_health_and_is_exposed(docs):
    server = find(docs, "Deployment", "embedq-server")
    main = container(server)
    jsonschema.validate(main, SERVER)
    assert main["args"][0] == "server"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["grpc"] == GRPC_PORT
    assert main["args"][main["args"].index("--port") + 1] == str(GRPC_PORT)
    assert main["args"][main["args"].index("--host") + 1] == "0.0.0.0"  # not loopback
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert server["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and d["metadata"]["name"].startswith("embedq-server")
    ]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        (port,) = service["spec"]["ports"]
        assert port["port"] == GRPC_PORT and port["targetPort"] in ("grpc", GRPC_PORT)


def test_server_liveness_does_not_follow_redis(docs):
    """A Redis outage makes servers unready (out of the Services), never restarts them."""
    main = container(find(docs, "Deployment", "embedq-server"))
    assert main["readinessProbe"] != main["livenessProbe"]
    assert main["readinessProbe"]["grpc"].get("service", "") == ""
    for name in ("livenessProbe", "startupProbe"):
        assert "grpc" not in main[name] and "tcpSocket" in main[name], name
    # Long enough for a slow node, short enough to restart a wedged process.
    live = main["livenessProbe"]
    assert 30 <= live["periodSeconds"] * live["failureThreshold"] <= 120


def test_worker_probes_the_metrics_port_configured_for_it(docs):
    main = container(find(docs, "Deployment", "embedq-worker"))
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    config = find(docs, "ConfigMap", "embedq-config")["data"]
    assert ports["metrics"] == int(config["EMBEDQ_METRICS_PORT"])
    assert config["EMBEDQ_METRICS_HOST"] == "0.0.0.0"  # the kubelet probes the pod IP
    start = main["startupProbe"]
    # Model load and CUDA start-up before liveness counts: minutes, not seconds.
    assert start["periodSeconds"] * start["failureThreshold"] >= 120


@pytest.mark.parametrize("name", ["embedq-server", "embedq-worker"])
def test_pod_disruption_budgets(docs, name):
    budget = find(docs, "PodDisruptionBudget", name)
    assert budget["apiVersion"] == "policy/v1"
    deployment = find(docs, "Deployment", name)
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    spec = budget["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    replicas = deployment["spec"]["replicas"]
    # A drain can always make progress, and never takes every pod.
    if "minAvailable" in spec:
        assert 1 <= spec["minAvailable"] < replicas
    else:
        assert 1 <= spec["maxUnavailable"] < replicas


def test_worker_requests_one_gpu_and_uses_device_0(docs):
    worker = find(docs, "Deployment", "embedq-worker")
    main = container(worker)
    jsonschema.validate(main, WORKER)
    args = main["args"]
    assert args[0] == "worker"
    assert args[args.index("--devices") + 1] == "0"
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert worker["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_settings_come_from_the_configmap_and_passwords_from_a_secret(docs):
    config = find(docs, "ConfigMap", "embedq-config")
    data = config["data"]
    assert all(isinstance(v, str) for v in data.values())  # env values must be strings
    assert not [k for k in data if SECRETISH.search(k)], "a secret in the ConfigMap"
    url = urlsplit(data["EMBEDQ_REDIS_URL"])
    assert url.scheme in ("redis", "rediss") and url.password is None
    assert {"EMBEDQ_NAMESPACE", "EMBEDQ_REDIS_URL"} <= set(data)

    secrets_used = set()
    for name in ("embedq-server", "embedq-worker"):
        main = container(find(docs, "Deployment", name))
        assert {"configMapRef": {"name": "embedq-config"}} in main["envFrom"]
        env = {e["name"]: e for e in main["env"]}
        ref = env["EMBEDQ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        secrets_used.add((ref["name"], ref["key"]))
    # Redis itself takes the same password from the same Secret.
    redis = container(find(docs, "Deployment", "embedq-redis"))
    for entry in redis["env"]:
        jsonschema.validate(entry, ENV_VAR)
        if SECRETISH.search(entry["name"]):
            ref = entry["valueFrom"]["secretKeyRef"]
            secrets_used.add((ref["name"], ref["key"]))
    assert secrets_used == {("embedq-redis", "password")}
    # No Secret objects with data in git, and no password on any command line.
    assert not [d for d in docs if d["kind"] == "Secret"]
    for doc in docs:
        if doc["kind"] == "Deployment":
            for c in pod(doc)["containers"]:
                line = " ".join(c.get("command", []) + c.get("args", []))
                assert "--requirepass" not in line and "--pass" not in line
                for match in re.finditer(r"requirepass\s+(\S+)", line):
                    assert match.group(1).strip("\"'").startswith("$"), line
    readme = (K8S / "README.md").read_text()
    assert "kubectl create secret generic embedq-redis" in readme


# ---- the optional KEDA autoscaler (deploy/k8s/autoscaling) --------------------------
# KEDA's CRD is not among the Kubernetes API schemas: the fields it needs here,
# as its documentation gives them (keda.sh/docs/scalers/redis-streams).

AUTOSCALING = K8S / "autoscaling"
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS_LABEL}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"const": "Deployment"},
                        "apiVersion": {"const": "apps/v1"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "redis-streams"},
                            "metadata": {
                                "type": "object",
                                "required": ["address", "stream", "consumerGroup"],
                                "additionalProperties": False,
                                "properties": {
                                    "address": {"type": "string", "pattern": r"^[^:/\s]+:\d+$"},
                                    "passwordFromEnv": {"type": "string"},
                                    "usernameFromEnv": {"type": "string"},
                                    "databaseIndex": {"type": "string", "pattern": r"^\d+$"},
                                    "enableTLS": {"enum": ["true", "false"]},
                                    "stream": {"type": "string"},
                                    "consumerGroup": {"type": "string"},
                                    # Trigger values are strings in KEDA.
                                    "pendingEntriesCount": {"type": "string", "pattern": r"^\d+$"},
                                    "streamLength": {"type": "string", "pattern": r"^\d+$"},
                                    "lagCount": {"type": "string", "pattern": r"^\d+$"},
                                    "activationLagCount": {"type": "string"},
                                },
                                # Never a password in the manifest.
                                "not": {"required": ["password"]},
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_keda_autoscaler_scales_workers_on_the_job_stream(docs):
    from embedq.keys import CONSUMER_GROUP, Keys

    (path,) = [p for p in AUTOSCALING.glob("*.yaml") if p.name != "kustomization.yaml"]
    kustomization = yaml.safe_load((AUTOSCALING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [path.name]
    # Optional: the base apply must work on a cluster without KEDA.
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not [r for r in base["resources"] if r.startswith("autoscaling")]

    (scaled,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    worker = find(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert worker["metadata"]["name"] == "embedq-worker"
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]

    config = find(docs, "ConfigMap", "embedq-config")["data"]
    redis_url = urlsplit(config["EMBEDQ_REDIS_URL"])
    env = {e["name"] for e in container(worker)["env"]}
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    # The stream and group the workers really read (embedq.keys), for the bundled model.
    assert meta["stream"] == Keys(config["EMBEDQ_NAMESPACE"]).jobs("all-MiniLM-L6-v2")
    assert meta["consumerGroup"] == CONSUMER_GROUP
    host, port = meta["address"].rsplit(":", 1)
    assert host.split(".")[0] == redis_url.hostname and int(port) == redis_url.port
    assert meta.get("databaseIndex", "0") == redis_url.path.strip("/")
    assert meta["passwordFromEnv"] in env  # resolved from the worker container, i.e. the Secret
    # The capacity plan's headroom: 0.7 of the 64 jobs a worker holds per read.
    from embedq.settings import WorkerSettings

    read_count = WorkerSettings.__dataclass_fields__["read_count"].default
    assert int(meta["pendingEntriesCount"]) == round(0.7 * read_count)

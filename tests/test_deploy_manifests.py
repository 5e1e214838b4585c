"""The deployment manifests under deploy/: they parse, the kustomize overlays build, the documents are valid, and
they agree with the code (the topic catalogue, the stage names, the settings).

What is checked, and how:
* every YAML document under deploy/ parses;
* the kustomize overlays are built by a small resolver below, which knows exactly what these kustomizations use
  (resources: files and directories; namespace; images; patches: JSON 6902 patch files with a target of kind and
  optional name). Every listed resource must exist and every patch must match at least one resource. Where a
  ``kubectl`` binary is on the PATH the same overlays are also built by ``kubectl kustomize`` and must come out
  identical, which checks the resolver itself;
* core Kubernetes kinds are validated against the Kubernetes JSON schemas shipped by the ``kubernetes-validate``
  package (strict: unknown fields are errors) when it is installed;
* custom resources (Strimzi Kafka/KafkaNodePool/KafkaTopic, KEDA ScaledObject, Prometheus PodMonitor) have no
  schemas offline: a hand-written check of the fields these manifests rely on;
* cross-checks: every topic of streams.topics.CATALOGUE has a KafkaTopic with its name, partitions and retention,
  and nothing else does; every ``vidgen stage NAME`` is a stage ``vidgen stage`` accepts and every stage runs;
  references (ConfigMaps, PVCs, scale targets, PDB and PodMonitor selectors, ports) resolve;
  the compose file has KRaft Kafka, a registry, the one-shot ``vidgen topics`` and the same stages.
What cannot be checked here: that a cluster with Strimzi, KEDA and the Prometheus Operator accepts the custom
resources (their CRDs' full schemas are not available offline), that images exist, and anything at run time
(``docker compose config`` and a real cluster are not available on these machines).
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streams.topics import CATALOGUE, ENCODED
from vidgen.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
COMPOSE = DEPLOY / "compose" / "compose.yaml"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# -- a minimal kustomize ------------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _walk(doc, parts):
    node = doc
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_json6902(doc: dict, ops: list[dict], where: str) -> None:
    for op in ops:
        parts = _pointer(op["path"])
        parent, last = _walk(doc, parts[:-1]), parts[-1]
        kind = op["op"]
        if kind == "test":
            assert _walk(doc, parts) == op["value"], f"{where}: test failed at {op['path']}"
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                assert int(last) < len(parent), f"{where}: nothing to replace at {op['path']}"
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                assert last in parent, f"{where}: nothing to replace at {op['path']}"
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"{where}: unsupported JSON 6902 op {kind!r}")


def _matches(doc: dict, target: dict) -> bool:
    if target.get("kind") and doc["kind"] != target["kind"]:
        return False
    if target.get("name") and not re.fullmatch(target["name"], doc["metadata"]["name"]):
        return False
    return True


def _set_images(doc: dict, images: list[dict]) -> None:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
        name = re.split(r"[:@]", container["image"])[0]
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}" if "newTag" in image \
                    else image.get("newName", name)


def kustomize(directory: Path) -> list[dict]:
    """Build a kustomization the way kustomize does for the features these manifests use (and fail on others)."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"no kustomization.yaml in {directory}"
    k = yaml.safe_load(kfile.read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert set(k) <= known, f"{kfile}: fields {sorted(set(k) - known)} are not understood by this resolver"
    docs: list[dict] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{kfile}: resource {resource} does not exist"
        docs += kustomize(path) if path.is_dir() else load_docs(path)
    for patch in k.get("patches", []):
        path = directory / patch["path"]
        assert path.is_file(), f"{kfile}: patch {patch['path']} does not exist"
        ops = yaml.safe_load(path.read_text())
        assert isinstance(ops, list), f"{path}: only JSON 6902 patches (a list of operations) are used here"
        hits = [doc for doc in docs if _matches(doc, patch.get("target", {}))]
        assert hits, f"{kfile}: patch {patch['path']} targets {patch.get('target')}, which matches no resource"
        for doc in hits:
            apply_json6902(doc, ops, f"{path} on {doc['kind']}/{doc['metadata']['name']}")
    for doc in docs:
        if k.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = k["namespace"]
        if k.get("images"):
            _set_images(doc, k["images"])
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, kustomize(K8S / "overlays" / request.param)


def by_kind(docs, kind):
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs):
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc, spec["template"]["spec"]


def commands(docs):
    for doc, pod in pod_specs(docs):
        for container in pod["containers"]:
            yield doc, container, list(container.get("command", [])) + list(container.get("args", []))


# -- parsing and building -----------------------------------------------------------------------------------------
def test_every_yaml_document_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc, (dict, list)), f"{path}: a document is neither a mapping nor a list"


def test_every_manifest_file_is_used_by_a_kustomization():
    used = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        used |= {(kfile.parent / r).resolve() for r in k.get("resources", [])}
        used |= {(kfile.parent / p["path"]).resolve() for p in k.get("patches", [])}
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in used, f"{path.relative_to(ROOT)} is in no kustomization"


def test_overlays_build_with_unique_resources(overlay):
    name, docs = overlay
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{name}: duplicate resources"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        assert DNS_1123.match(doc["metadata"]["name"]), doc["metadata"]["name"]
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "vidgen"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on the PATH: only the Python resolver ran")
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_resolver_agrees_with_kubectl_kustomize(name):
    built = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True,
                           timeout=60)
    assert built.returncode == 0, built.stderr

    def keyed(docs):
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert keyed(yaml.safe_load_all(built.stdout)) == keyed(kustomize(K8S / "overlays" / name))


# -- schemas ------------------------------------------------------------------------------------------------------
def test_core_kinds_are_valid_against_the_kubernetes_schemas(overlay):
    kv = pytest.importorskip("kubernetes_validate")
    name, docs = overlay
    checked = 0
    for doc in docs:
        try:
            kv.validate(doc, "1.32.0", strict=True)
            checked += 1
        except kv.SchemaNotFoundError:
            assert doc["apiVersion"].split("/")[0].count(".") >= 1, f"no schema for core kind {doc['kind']}"
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert checked >= 20
    broken = copy.deepcopy(by_kind(docs, "Deployment")["gpu-agent"])
    broken["spec"]["template"]["spec"]["containers"][0]["comand"] = ["typo"]
    with pytest.raises(kv.ValidationError):  # the validator does reject what it should
        kv.validate(broken, "1.32.0", strict=True)


def test_strimzi_resources(overlay):
    name, docs = overlay
    clusters = by_kind(docs, "Kafka")
    assert list(clusters) == ["vidgen-kafka"]
    kafka = clusters["vidgen-kafka"]
    assert kafka["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert kafka["metadata"]["annotations"] == {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"}
    assert "zookeeper" not in kafka["spec"]
    listeners = kafka["spec"]["kafka"]["listeners"]
    assert {"name", "port", "type", "tls"} <= set(listeners[0]) and any(l["port"] == 9092 for l in listeners)
    assert kafka["spec"]["entityOperator"]["topicOperator"] == {}
    pools = by_kind(docs, "KafkaNodePool")
    roles = set()
    for pool in pools.values():
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == "vidgen-kafka"
        assert isinstance(pool["spec"]["replicas"], int) and pool["spec"]["replicas"] >= 1
        assert set(pool["spec"]["roles"]) <= {"controller", "broker"}
        assert pool["spec"]["storage"]["type"] in ("jbod", "persistent-claim", "ephemeral")
        roles |= set(pool["spec"]["roles"])
    assert roles == {"controller", "broker"}
    brokers = sum(p["spec"]["replicas"] for p in pools.values() if "broker" in p["spec"]["roles"])
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] <= brokers and config["min.insync.replicas"] <= brokers
    for topic in by_kind(docs, "KafkaTopic").values():
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "vidgen-kafka"
        assert 1 <= topic["spec"]["replicas"] <= brokers
        assert topic["spec"]["config"]["min.insync.replicas"] <= topic["spec"]["replicas"]


def test_keda_scaled_objects(overlay):
    name, docs = overlay
    deployments = by_kind(docs, "Deployment")
    scaled = by_kind(docs, "ScaledObject")
    assert {"gpu-agent", "prompt-encoder", "compliance", "vae-decoder"} <= set(scaled)
    topic_names = {t.name for t in CATALOGUE}
    for so_name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] in ("kafka", "prometheus", "cpu", "memory")
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata is string-valued"
            assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value", "Utilization")
            if trigger["type"] == "kafka":
                meta = trigger["metadata"]
                assert {"bootstrapServers", "consumerGroup", "lagThreshold"} <= set(meta)
                stage = spec["scaleTargetRef"]["name"]
                assert meta["consumerGroup"] == f"vidgen.{stage}"  # streams/stage.py Stage.group_id
                assert meta.get("topic", next(iter(topic_names))) in topic_names
                assert meta["bootstrapServers"].startswith("vidgen-kafka-kafka-bootstrap:")
            if trigger["type"] == "prometheus":
                assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    agent = scaled["gpu-agent"]["spec"]
    # The agents' backlog is the scheduler's queue (streams/metrics.py SchedulerQueueCollector), not a consumer
    # group's lag: agents are in no group, and the scheduler commits the tier topics' records at once.
    assert not [t for t in agent["triggers"] if t["type"] == "kafka"]
    queue_trigger = next(t for t in agent["triggers"] if "vidgen_scheduler_waiting_jobs" in t["metadata"].get("query", ""))
    assert queue_trigger["type"] == "prometheus" and queue_trigger["metricType"] == "Value"
    assert queue_trigger["metadata"]["query"].startswith("sum(")  # the standby exports nothing: the sum is the queue
    assert queue_trigger["metadata"]["threshold"] == "100"  # the seed: more than 100 waiting → +10%
    tier_partitions = sum(t.partitions for t in ENCODED.values())  # the old bound, when agents consumed them
    assert agent["maxReplicaCount"] > tier_partitions and (name != "prod" or agent["maxReplicaCount"] >= 10_000)
    assert "scheduler" not in {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()}
    behavior = agent["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert {"type": "Percent", "value": 10, "periodSeconds": 120} in behavior["scaleUp"]["policies"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 1800  # under 40% for 30 minutes
    for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert hpa["spec"]["scaleTargetRef"]["name"] != "scheduler"
        assert hpa["spec"]["scaleTargetRef"]["name"] not in {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()}


def test_pod_monitors_and_disruption_budgets_select_real_pods(overlay):
    name, docs = overlay
    templates = [(d, pod, d["spec"]["template"]["metadata"]["labels"]) for d, pod in pod_specs(docs)
                 if d["kind"] == "Deployment"]

    def selected(selector):
        return [(d, pod) for d, pod, labels in templates if selector.items() <= labels.items()]

    for monitor in by_kind(docs, "PodMonitor").values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        pods = selected(monitor["spec"]["selector"]["matchLabels"])
        assert pods, f"PodMonitor {monitor['metadata']['name']} selects nothing"
        ports = {p["name"] for _, pod in pods for c in pod["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if name == "prod" or monitor["metadata"]["name"] == "vidgen":
                assert endpoint["port"] in ports, f"{name}: no container port named {endpoint['port']}"
    metrics_ports = {c["name"]: p["containerPort"] for d, pod in pod_specs(docs) for c in pod["containers"]
                     for p in c.get("ports", []) if p["name"] == "metrics"}
    assert set(metrics_ports.values()) == {9400}
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]["name"]


# -- agreement with the code --------------------------------------------------------------------------------------
def test_every_catalogue_topic_has_a_kafka_topic_and_nothing_else_does(overlay):
    name, docs = overlay
    manifests = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in by_kind(docs, "KafkaTopic").values()}
    assert set(manifests) == {t.name for t in CATALOGUE}
    for topic in CATALOGUE:
        doc = manifests[topic.name]
        assert doc["spec"]["partitions"] == topic.partitions, topic.name
        assert doc["spec"]["config"]["retention.ms"] == topic.retention_ms, topic.name
        assert doc["metadata"]["name"] == topic.name.replace(".", "-")


def test_every_vidgen_stage_command_names_a_real_stage_and_every_stage_runs(overlay):
    name, docs = overlay
    ran = set()
    for doc, container, argv in commands(docs):
        if argv[:2] == ["vidgen", "stage"]:
            assert len(argv) == 3, argv
            stage = argv[2]
            assert stage in STAGES, f"{doc['metadata']['name']}: unknown stage {stage}"
            assert doc["metadata"]["name"] == stage
            ran.add(stage)
    assert set(STAGES) <= ran, f"{name}: stages without a Deployment: {set(STAGES) - ran}"
    assert ("gateway" in by_kind(docs, "Deployment")
            and next(c for _, c, a in commands(docs) if a[:2] == ["vidgen", "gateway"])["ports"][0]["containerPort"] == 8080)
    assert any(a == ["vidgen", "topics"] for _, _, a in commands(docs))


def test_settings_references_and_the_gpu_agent(overlay):
    name, docs = overlay
    config = by_kind(docs, "ConfigMap")["vidgen-settings"]["data"]
    assert all(key.startswith("VIDGEN_") for key in config)
    # Any other VIDGEN_KAFKA_* would be handed to librdkafka as a client setting (streams/settings.py).
    assert [k for k in config if k.startswith("VIDGEN_KAFKA_")] == ["VIDGEN_KAFKA_BOOTSTRAP"]
    assert config["VIDGEN_KAFKA_BOOTSTRAP"].split(":")[0] == "vidgen-kafka-kafka-bootstrap"
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    for doc, pod in pod_specs(docs):
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in by_kind(docs, "ConfigMap")
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}
    agent = by_kind(docs, "Deployment")["gpu-agent"]["spec"]["template"]["spec"]
    assert agent["terminationGracePeriodSeconds"] >= 300
    for container in agent["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert len(agent["containers"]) == (8 if name == "prod" else 1)
    agent_ports = [p["containerPort"] for c in agent["containers"] for p in c["ports"]]
    assert len(agent_ports) == len(set(agent_ports))
    scheduler = by_kind(docs, "Deployment")["scheduler"]
    assert scheduler["spec"]["replicas"] == (2 if name == "prod" else 1)  # prod: one active, one standby
    assert [c["command"] for c in scheduler["spec"]["template"]["spec"]["containers"]] == [
        ["vidgen", "stage", "scheduler"]]  # one process per pod: the lease decides which pod leads
    budget = by_kind(docs, "PodDisruptionBudget")["scheduler"]["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "scheduler"}}}
    compliance = by_kind(docs, "Deployment")["compliance"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in compliance["containers"][0].get("env", [])}
    if name == "prod":
        secret_mounts = [v for v in compliance["volumes"] if "secret" in v]
        assert secret_mounts and secret_mounts[0]["secret"]["secretName"] == "vidgen-signing"
        mount = next(m for m in compliance["containers"][0]["volumeMounts"] if m["name"] == secret_mounts[0]["name"])
        assert env["VIDGEN_SIGNING_CHAIN"].startswith(mount["mountPath"] + "/")
        assert env["VIDGEN_SIGNING_KEY"].startswith(mount["mountPath"] + "/")
    else:
        assert "VIDGEN_SIGNING_CHAIN" not in env  # dev signs with the development chain under var/c2pa


# -- compose ------------------------------------------------------------------------------------------------------
def test_compose_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    registry = services["schema-registry"]
    assert "schema-registry" in registry["image"] or "apicurio" in registry["image"]
    assert services["topics"]["command"] == ["vidgen", "topics"]
    assert services["topics"]["restart"] == "no"
    ran = set()
    for name, service in services.items():
        argv = service.get("command") or []
        if argv[:2] == ["vidgen", "stage"]:
            assert argv[2] in STAGES, f"{name}: unknown stage {argv[2]}"
            ran.add(argv[2])
            assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
            assert service["environment"]["VIDGEN_KAFKA_BOOTSTRAP"] == "kafka:9092"
            assert service["environment"]["VIDGEN_SCHEMA_REGISTRY_URL"].startswith("http://schema-registry:")
            kafka_keys = [k for k in service["environment"] if k.startswith("VIDGEN_KAFKA_")]
            assert kafka_keys == ["VIDGEN_KAFKA_BOOTSTRAP"]
    assert set(STAGES) <= ran
    assert services["gateway"]["command"][:2] == ["vidgen", "gateway"]
    k8s_stages = {a[2] for _, _, a in commands(kustomize(K8S / "overlays" / "dev")) if a[:2] == ["vidgen", "stage"]}
    assert ran == k8s_stages, "compose and Kubernetes run different stage sets"
    dockerfile = COMPOSE.parent / services["topics"]["build"]["dockerfile"].split("/")[-1]
    assert dockerfile.is_file()

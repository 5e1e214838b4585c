"""The deployment manifests under deploy/: they parse, the kustomize overlays build, the documents are valid, and
they agree with the code (the topic catalogue, the stage names, the settings).

What is checked, and how:
* every YAML document under deploy/ parses;
* the kustomize overlays are built by a small resolver below, which knows exactly what these kustomizations use
  (resources: files and directories; components; namespace; images; patches: JSON 6902 patch files with a target of
  kind and optional name or labelSelector). Every listed resource must exist and every patch must match at least
  one resource, but for one selecting by label (as in kustomize, it may match nothing: components/blobs-rwx serves
  overlays with and without what it selects). Where a ``kubectl`` binary is on the PATH the same overlays, and each
  with components/blobs-rwx, are also built by ``kubectl kustomize`` and must come out identical, which checks the
  resolver itself;
* core Kubernetes kinds are validated against the Kubernetes JSON schemas shipped by the ``kubernetes-validate``
  package (strict: unknown fields are errors) when it is installed;
* custom resources (Strimzi Kafka/KafkaNodePool/KafkaTopic, KEDA ScaledObject, Prometheus PodMonitor) have no
  schemas offline: a hand-written check of the fields these manifests rely on;
* cross-checks: every topic of streams.topics.CATALOGUE has a KafkaTopic with its name, partitions and retention,
  and nothing else does; every ``vidgen stage NAME [options]`` parses with the CLI's own parser, names a stage, and
  every stage runs; references (ConfigMaps, PVCs, scale targets, PDB and PodMonitor selectors, ports) resolve;
  the settings every container gets load with streams.settings; agent groups (``gpu-agent --devices N``): N is the
  pod's GPU count, /dev/shm is a Memory emptyDir, the drain fits the grace period (torchrun's shutdown timeout
  covers the one-GPU agent's drain allowance, the grace period 30 s more), and every model of VIDGEN_MODEL_DEVICES
  maps to a size some gpu-agent Deployment provides;
* the GPU agents' autoscaling: one ``vidgen autoscale`` Deployment (1 replica) decides, its options parsed with the
  CLI's parser and then consumers.autoscaler's own; KEDA only applies its decision (the ScaledObject's one trigger is
  its vidgen_autoscale_desired_replicas gauge with AverageValue 1, so the HPA's desired replicas = the decision), with
  the same bounds, GPUs per pod and scrape path as the Deployments it sizes;
  the compose file has KRaft Kafka, a registry, the one-shot ``vidgen topics`` and the same stages;
* blobs: every stage and gateway container gets the bucket from the ConfigMap and its credentials from the Secret
  vidgen-blob-credentials (secretKeyRef), nothing else does; no ConfigMap holds a secret (by name or by value), and
  a secret-named variable never has a literal value; where VIDGEN_BLOB_URL is file:// (components/blobs-rwx, on dev
  and on prod) every such container mounts a ReadWriteMany claim there, and where it is s3:// none does; the dev
  MinIO serves the endpoint and bucket the settings name; third-party images are pinned to a release; the compose
  services share one blob setting, whose bucket its one-shot creates on its MinIO.
What cannot be checked here: that a cluster with Strimzi, KEDA and the Prometheus Operator accepts the custom
resources (their CRDs' full schemas are not available offline), that images exist, and anything at run time
(``docker compose config`` and a real cluster are not available on these machines).
"""
from __future__ import annotations

import argparse
import base64
import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

from streams.settings import load_settings
from streams.topics import CATALOGUE, ENCODED
from vidgen.cli import STAGES, build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
COMPOSE = DEPLOY / "compose" / "compose.yaml"
BLOBS_RWX = K8S / "components" / "blobs-rwx"
#: The Secret and keys the blob store's credentials come from, and the variables they become (streams/settings.py).
BLOB_SECRET = "vidgen-blob-credentials"
BLOB_CREDENTIALS = {"VIDGEN_BLOB_ACCESS_KEY_ID": "access_key_id", "VIDGEN_BLOB_SECRET_ACCESS_KEY": "secret_access_key"}
#: Names of settings that are secrets: never in a ConfigMap, never a literal value.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|BASIC_AUTH|PRIVATE", re.IGNORECASE)
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
    if target.get("labelSelector"):  # equality requirements only: "key=value,key2=value2"
        labels = doc["metadata"].get("labels") or {}
        wanted = dict(part.split("=", 1) for part in target["labelSelector"].split(","))
        if any(labels.get(key.strip()) != value.strip() for key, value in wanted.items()):
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


def kustomize(directory: Path, accumulated: list[dict] | None = None) -> list[dict]:
    """Build a kustomization the way kustomize does for the features these manifests use (and fail on others).
    A Component (``accumulated`` given) adds its resources to what its user has built so far and patches the lot;
    a kustomization applies its components after its resources, before its own patches."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"no kustomization.yaml in {directory}"
    k = yaml.safe_load(kfile.read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
    assert set(k) <= known, f"{kfile}: fields {sorted(set(k) - known)} are not understood by this resolver"
    component = k.get("kind") == "Component"
    assert component == (accumulated is not None), f"{kfile}: a Component is listed under components, only there"
    docs: list[dict] = accumulated if accumulated is not None else []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{kfile}: resource {resource} does not exist"
        docs += kustomize(path) if path.is_dir() else load_docs(path)
    for name in k.get("components", []):
        docs = kustomize((directory / name).resolve(), docs)
    for patch in k.get("patches", []):
        path = directory / patch["path"]
        assert path.is_file(), f"{kfile}: patch {patch['path']} does not exist"
        ops = yaml.safe_load(path.read_text())
        assert isinstance(ops, list), f"{path}: only JSON 6902 patches (a list of operations) are used here"
        target = patch.get("target", {})
        hits = [doc for doc in docs if _matches(doc, target)]
        assert hits or target.get("labelSelector"), \
            f"{kfile}: patch {patch['path']} targets {target}, which matches no resource"
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


def with_blobs_rwx(directory: Path, overlay_name: str) -> Path:
    """An overlay of ``overlay_name`` using components/blobs-rwx, as an operator would write it (relative paths:
    kustomize refuses absolute ones), in ``directory``."""
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay_name, directory)],
        "components": [os.path.relpath(BLOBS_RWX, directory)]}))
    return directory


#: Every build checked for its blob settings: base alone, the overlays, and each overlay with the RWX component.
BUILDS = ("base", *OVERLAYS, *(f"{name}+blobs-rwx" for name in OVERLAYS))


def build_dir(name: str, tmp_path_factory) -> Path:
    if name == "base":
        return K8S / "base"
    if name.endswith("+blobs-rwx"):
        overlay_name = name.removesuffix("+blobs-rwx")
        return with_blobs_rwx(tmp_path_factory.mktemp(f"{overlay_name}-blobs-rwx"), overlay_name)
    return K8S / "overlays" / name


@pytest.fixture(scope="module", params=BUILDS)
def build(request, tmp_path_factory):
    return request.param, kustomize(build_dir(request.param, tmp_path_factory))


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


def stage_args(argv: list[str]):
    """`vidgen stage NAME [--devices N ...]` parsed by the CLI's own parser (None for any other command)."""
    if argv[:2] != ["vidgen", "stage"]:
        return None
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`vidgen` rejects the arguments {argv[1:]}")


def gpu_agents(docs):
    """(Deployment, pod spec, container, devices) of every container running the gpu-agent stage."""
    for doc, container, argv in commands(docs):
        args = stage_args(argv)
        if args is not None and args.name == "gpu-agent":
            yield doc, doc["spec"]["template"]["spec"], container, args.devices


#: The options of `vidgen autoscale` these manifests pass, with their types: used only where consumers.autoscaler
#: (whose parser is the real one) cannot be imported, to check the names at least.
AUTOSCALE_OPTIONS = {"--stage": str, "--interval": float, "--policy": str, "--gpus-per-replica": int,
                     "--lead-s": float, "--wait-objectives": str, "--min": int, "--max": int}


class _ParserCaught(Exception):
    def __init__(self, parser):
        super().__init__("caught")
        self.parser = parser


def autoscale_parser() -> argparse.ArgumentParser | None:
    """The parser `vidgen autoscale` hands its arguments to: consumers.autoscaler's build_parser() where it has one,
    else the one its main() builds, caught as main() starts parsing (nothing runs); None where the module does not
    import (then AUTOSCALE_OPTIONS stands in)."""
    try:
        from consumers import autoscaler
    except ImportError:
        return None
    if callable(getattr(autoscaler, "build_parser", None)):
        return autoscaler.build_parser()

    def catch(self, *args, **kwargs):
        raise _ParserCaught(self)

    def never(*args, **kwargs):
        raise AssertionError("consumers.autoscaler.main ran past its argument parsing")

    # parse_args calls parse_known_args: catching the latter catches both. run_autoscale is a second guard.
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch), \
            mock.patch.object(autoscaler, "run_autoscale", never):
        try:
            autoscaler.main([])
        except _ParserCaught as caught:
            return caught.parser
    pytest.fail("consumers.autoscaler.main parsed no arguments")


def autoscale_args(argv: list[str]) -> argparse.Namespace | None:
    """`vidgen autoscale [options]` parsed as the CLI does it (vidgen.cli.main: the `vidgen` parser takes the command
    and passes the rest through to consumers.autoscaler.main's parser); None for any other command."""
    if argv[:2] != ["vidgen", "autoscale"]:
        return None
    top, rest = build_parser().parse_known_args(argv[1:])
    assert top.command == "autoscale", argv
    parser = autoscale_parser()
    if parser is None:  # fallback: the option names and value types from the list above
        parser = argparse.ArgumentParser(prog="vidgen autoscale (AUTOSCALE_OPTIONS)")
        for option, kind in AUTOSCALE_OPTIONS.items():
            parser.add_argument(option, type=kind, action="append" if option == "--stage" else "store")
    try:
        return parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"`vidgen autoscale` rejects the arguments {rest}")


def autoscale_deployments(docs):
    """(Deployment, container, parsed options) of every container running `vidgen autoscale`."""
    for doc, container, argv in commands(docs):
        args = autoscale_args(argv)
        if args is not None:
            yield doc, container, args


def container_env(docs, container: dict) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps' data, then its own env entries over them."""
    configmaps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env") or [] if "value" in e})
    return env


#: What the gpu-agent ScaledObject must scale on: the decision `vidgen autoscale` exports, one series per stage.
DESIRED_QUERY = re.compile(r"^max\(vidgen_autoscale_desired_replicas\{([^}]*)\}\)$")


def quantity(text) -> float:
    """A Kubernetes quantity ("32Gi", "500M", "2") in bytes or units."""
    match = re.fullmatch(r"([0-9.]+)([KMGTPE]i?|m)?", str(text))
    assert match, f"not a quantity: {text!r}"
    number, suffix = float(match.group(1)), match.group(2) or ""
    if suffix == "m":
        return number / 1000
    power = "KMGTPE".index(suffix[0]) + 1 if suffix else 0
    return number * (1024 if suffix.endswith("i") else 1000) ** power


#: torchrun's wait between passing SIGTERM to the ranks and SIGKILLing them (torch.distributed.run
#: --shutdown-timeout; the environment: PET_SHUTDOWN_TIMEOUT, then TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s). It runs
#: from the SIGTERM, not from the end of a drain: the ranks' whole drain must fit in it.
TORCHRUN_DEFAULT_SHUTDOWN_S = 30
#: What the pod's grace period must add to torchrun's shutdown timeout: its SIGKILL, its exit and the preStop loop.
GROUP_EXIT_MARGIN_S = 30


def torchrun_shutdown_s(container: dict) -> int:
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    value = env.get("PET_SHUTDOWN_TIMEOUT") or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    return int(value) if value else TORCHRUN_DEFAULT_SHUTDOWN_S


# -- parsing and building -----------------------------------------------------------------------------------------
class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; kubectl and docker compose refuse the file. Merged keys (<<) may
    be overridden, as YAML means them to be."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def test_every_yaml_document_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc, (dict, list)), f"{path}: a document is neither a mapping nor a list"
        with open(path) as f:
            list(yaml.load_all(f, Loader=UniqueKeyLoader))  # raises on a key given twice in one mapping
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("{a: 1, b: 2, a: 3}", Loader=UniqueKeyLoader)


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
@pytest.mark.parametrize("name", BUILDS[1:])
def test_the_resolver_agrees_with_kubectl_kustomize(name, tmp_path_factory):
    directory = build_dir(name, tmp_path_factory)
    built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr

    def keyed(docs):
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert keyed(yaml.safe_load_all(built.stdout)) == keyed(kustomize(directory))


# -- schemas ------------------------------------------------------------------------------------------------------
def test_core_kinds_are_valid_against_the_kubernetes_schemas(build):
    kv = pytest.importorskip("kubernetes_validate")
    name, docs = build
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
    # KEDA applies what `vidgen autoscale` decides: the decision gauge is the one trigger (the HPA takes the largest
    # wish of its triggers, so any other would override the policy whenever it asked for more).
    assert len(agent["triggers"]) == 1, f"{name}: the gpu-agent ScaledObject has triggers besides the policy's"
    trigger = agent["triggers"][0]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    match = DESIRED_QUERY.match(meta["query"].replace(" ", ""))
    assert match, f"{name}: {meta['query']} is not max(vidgen_autoscale_desired_replicas{{...}})"
    matchers = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
    assert re.sub(r'\w+="[^"]*"', "", match.group(1)).strip(",") == "", f"only equality matchers: {meta['query']}"
    assert matchers.get("stage") == "gpu-agent", meta["query"]
    assert matchers.get("namespace", "vidgen") == "vidgen", meta["query"]
    # AverageValue: the HPA wants ceil(metric / threshold) replicas = the decision with threshold 1. (Value would
    # want ceil(current x metric / threshold): the decision times the current size.)
    assert trigger.get("metricType", "AverageValue") == "AverageValue" and meta["threshold"] == "1", trigger
    # No decision (the autoscale pod down, Prometheus unreachable) is an error, on which the HPA holds its size; an
    # empty result read as 0 would shrink the fleet to minReplicaCount.
    assert meta.get("ignoreNullValues") == "false", f"{name}: a missing decision must not read as 0 replicas"
    fallback = agent.get("fallback")
    assert fallback is None or fallback.get("behavior") == "currentReplicas", (
        f"{name}: a fixed fallback.replicas would replace the policy's number while its metric is missing")
    tier_partitions = sum(t.partitions for t in ENCODED.values())  # the old bound, when agents consumed them
    assert agent["maxReplicaCount"] > tier_partitions and (name != "prod" or agent["maxReplicaCount"] >= 10_000)
    assert "scheduler" not in {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()}
    # The HPA follows the decision at once in both directions: the policy paces itself, a stabilisation window or a
    # slow policy here would pace it a second time (the old 1800 s scale-down window held the fleet 30 minutes).
    behavior = agent["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        rules = behavior[direction]
        assert rules.get("stabilizationWindowSeconds") == 0, f"{name}: {direction} has a stabilisation window"
        assert rules.get("selectPolicy", "Max") == "Max", f"{name}: {direction}: {rules.get('selectPolicy')}"
        assert any(p["type"] == "Percent" and p["value"] >= 100 and p["periodSeconds"] <= agent["pollingInterval"]
                   for p in rules["policies"]), f"{name}: {direction} cannot take a full step per polling interval"
    for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert hpa["spec"]["scaleTargetRef"]["name"] != "scheduler"
        assert hpa["spec"]["scaleTargetRef"]["name"] not in {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()}


def test_autoscale_decides_for_the_gpu_agents(overlay):
    """One `vidgen autoscale` decides the gpu-agent replicas, in pods of the gpu-agent Deployment's GPUs, within the
    ScaledObject's bounds, and serves its decision where Prometheus scrapes it."""
    name, docs = overlay
    found = list(autoscale_deployments(docs))
    assert [doc["metadata"]["name"] for doc, *_ in found] == ["autoscale"], f"{name}: one `vidgen autoscale`, in " \
                                                                          f"the Deployment autoscale"
    doc, container, args = found[0]
    # Exactly one decider: one replica, never two during a rollout, and nothing scales it.
    assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] == 1, f"{name}: autoscale replicas"
    assert doc["spec"].get("strategy", {}).get("type") == "Recreate", f"{name}: a rollout would run two deciders"
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in by_kind(docs, "ScaledObject").values()}
    targets |= {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert "autoscale" not in targets
    assert len(doc["spec"]["template"]["spec"]["containers"]) == 1
    assert args.stage == ["gpu-agent"], f"{name}: autoscale decides for {args.stage}"
    assert getattr(args, "policy", "demand") in (None, "demand"), f"{name}: the GPU agents run the demand policy"
    # Decisions are in gpu-agent pods: --gpus-per-replica is the GPUs of one pod (prod: eight one-GPU agent
    # containers; each container's limit is 1, the pod's sum 8).
    agent = by_kind(docs, "Deployment")["gpu-agent"]["spec"]["template"]["spec"]
    pod_gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in agent["containers"])
    assert args.gpus_per_replica == pod_gpus, f"{name}: --gpus-per-replica {args.gpus_per_replica}, pod GPUs {pod_gpus}"
    # The ScaledObject's bounds are the policy's: the HPA would clip a decision outside them (or the policy would
    # never ask for what the ScaledObject allows).
    scaled = by_kind(docs, "ScaledObject")["gpu-agent"]["spec"]
    if args.min is not None:
        assert scaled["minReplicaCount"] == args.min, f"{name}: minReplicaCount vs --min {args.min}"
    if args.max is not None:
        assert scaled["maxReplicaCount"] == args.max, f"{name}: maxReplicaCount vs --max {args.max}"
    # A decision reaches the HPA within a decision interval, a scrape and the HPA's 15 s sync: the lead the policy
    # plans with (pod start + model load, counted from the decision) must be longer than that alone.
    monitors = [m for m in by_kind(docs, "PodMonitor").values()
                if m["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    endpoints = [e for m in monitors for e in m["spec"]["podMetricsEndpoints"] if e["port"] in ports]
    assert endpoints, f"{name}: no PodMonitor scrapes the autoscale pod's {sorted(ports)}"
    scrape_s = max(quantity(e.get("interval", "30s").rstrip("s")) for e in endpoints)
    if getattr(args, "lead_s", None) is not None:
        assert args.lead_s > args.interval + scrape_s + 15, f"{name}: --lead-s {args.lead_s}"
    # It serves its gauges on VIDGEN_METRICS_PORT: that must be the scraped port.
    env = container_env(docs, container)
    scraped = {ports[e["port"]] for e in endpoints}
    assert int(env["VIDGEN_METRICS_PORT"]) in scraped, f"{name}: VIDGEN_METRICS_PORT {env['VIDGEN_METRICS_PORT']}, " \
                                                       f"scraped {sorted(scraped)}"
    assert ports.get("metrics") == int(env["VIDGEN_METRICS_PORT"])
    # The ScaledObject's query names the gauge the code exports, with its label.
    try:
        from consumers.autoscaler import DESIRED
    except ImportError:
        return
    metric = DESIRED.describe()[0].name
    query = scaled["triggers"][0]["metadata"]["query"]
    assert f"{metric}{{" in query.replace(" ", ""), f"{query} does not read {metric}"
    assert "stage" in DESIRED._labelnames


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
        args = stage_args(argv)  # options such as --devices N are parsed, not taken for the stage
        if args is not None:
            stage = args.name
            assert stage in STAGES, f"{doc['metadata']['name']}: unknown stage {stage}"
            if args.devices == 1:
                assert doc["metadata"]["name"] == stage
            else:  # an agent group: `vidgen stage gpu-agent --devices N` (only that stage runs across devices)
                assert stage == "gpu-agent", f"{doc['metadata']['name']}: --devices on the {stage} stage"
                assert doc["metadata"]["name"].startswith(f"{stage}-group"), doc["metadata"]["name"]
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


def test_gpu_agent_groups(overlay):
    """An agent group (`vidgen stage gpu-agent --devices N`, gpu_agents/group.py) is one pod of N GPUs running
    torchrun, which starts one rank per GPU."""
    name, docs = overlay
    deployments = by_kind(docs, "Deployment")
    single = deployments["gpu-agent"]["spec"]["template"]["spec"]
    single_container = single["containers"][0]
    groups = [(doc, pod, c, n) for doc, pod, c, n in gpu_agents(docs) if n > 1]
    assert "gpu-agent-group" in {doc["metadata"]["name"] for doc, *_ in groups}, f"{name}: no agent group"
    for doc, pod, container, devices in groups:
        where = f"{name}: {doc['metadata']['name']}"
        # One rank per GPU: torchrun starts --devices ranks, each takes one of the GPUs the pod was given.
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == devices, f"{where}: --devices {devices}, GPUs {resources}"
        assert resources["requests"].get("nvidia.com/gpu", devices) == devices, where
        assert len(pod["containers"]) == 1, f"{where}: a group's pod is its one container (torchrun and its ranks)"
        # NCCL between the ranks needs shared memory: /dev/shm from a Memory emptyDir with a sizeLimit, below the
        # container's memory limit (tmpfs pages count against it).
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
        assert mount, f"{where}: /dev/shm is not mounted"
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume.get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm is not a Memory emptyDir"
        size = volume["emptyDir"].get("sizeLimit")
        assert size, f"{where}: the /dev/shm emptyDir has no sizeLimit"
        assert quantity(size) < quantity(resources["limits"]["memory"]), f"{where}: /dev/shm {size} >= memory limit"
        # Draining. The rule: torchrun's shutdown timeout >= the one-GPU agent's drain allowance (its grace period),
        # and the group's grace period >= that timeout + 30 s (so >= 30 s + the one-GPU agent's allowance).
        drain_allowance = single["terminationGracePeriodSeconds"]
        shutdown = torchrun_shutdown_s(container)
        assert shutdown >= drain_allowance, (
            f"{where}: torchrun SIGKILLs the ranks {shutdown} s after passing on SIGTERM, a one-GPU agent gets "
            f"{drain_allowance} s to drain: set TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= shutdown + GROUP_EXIT_MARGIN_S, f"{where}: grace {grace} s < {shutdown} + {GROUP_EXIT_MARGIN_S}"
        assert container["lifecycle"]["preStop"] == single_container["lifecycle"]["preStop"], where
        # The rest as for the one-GPU agents: same settings, volumes, placement.
        assert container["envFrom"] == single_container["envFrom"], where
        single_mounts = {(m["name"], m["mountPath"]) for m in single_container["volumeMounts"]}
        assert single_mounts <= {(m["name"], m["mountPath"]) for m in container["volumeMounts"]}, where
        single_volumes = {v["name"]: v for v in single["volumes"]}
        assert all(v == single_volumes[v["name"]] for v in pod["volumes"] if v["name"] in single_volumes), where
        assert pod.get("nodeSelector") == single.get("nodeSelector"), where
        assert pod.get("tolerations") == single.get("tolerations"), where
        assert [p["name"] for p in container["ports"]] == ["metrics"]  # rank 0's; the other ranks serve none
        # A PodDisruptionBudget like the one-GPU agents'.
        labels = doc["spec"]["template"]["metadata"]["labels"]
        budgets = [b["spec"] for b in by_kind(docs, "PodDisruptionBudget").values()
                   if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert [b["maxUnavailable"] for b in budgets] == [by_kind(docs, "PodDisruptionBudget")["gpu-agent"]["spec"]
                                                         ["maxUnavailable"]], where
        # Fixed size: `vidgen autoscale --stage gpu-agent` sizes the one-GPU agents only (autoscaling.yaml).
        targets = {s["spec"]["scaleTargetRef"]["name"] for s in by_kind(docs, "ScaledObject").values()}
        targets |= {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
        assert doc["metadata"]["name"] not in targets, f"{where}: a group is autoscaled (fixed size)"


def test_model_devices_map_to_agents_that_exist(overlay):
    """VIDGEN_MODEL_DEVICES (the scheduler's: a job of a listed model runs only on an agent of exactly N devices)
    names known models and sizes some gpu-agent Deployment provides; every container's settings load."""
    name, docs = overlay
    config = by_kind(docs, "ConfigMap")["vidgen-settings"]["data"]
    for doc, container, argv in commands(docs):
        if any(s.get("configMapRef", {}).get("name") == "vidgen-settings" for s in container.get("envFrom", [])):
            env = {**config, **{e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}}
            load_settings(env)  # raises SettingsError on what the code would refuse at start-up
    settings = load_settings(config)
    sizes = {devices for doc, pod, container, devices in gpu_agents(docs) if doc["spec"].get("replicas", 1) > 0}
    assert 1 in sizes, f"{name}: no one-GPU agents (every model not in VIDGEN_MODEL_DEVICES needs one)"
    for model, devices in settings.model_devices.items():
        assert devices in sizes, f"{name}: {model} needs {devices} devices, the gpu-agents have {sorted(sizes)}"
    for size in sizes - {1}:
        assert size in settings.model_devices.values(), f"{name}: no model is mapped to the {size}-GPU groups: idle"
    # Listing the default model would send every job that names no model to the groups, past the one-GPU fleet.
    assert settings.model_devices.get(settings.default_model, 1) == 1, f"{name}: the default model needs a group"
    unknown = set(settings.model_devices) - set(settings.model_dirs)
    if unknown:  # built-in models (tiny stand-ins) are known without a directory
        from gpu_agents.models import BUILTIN_MODELS

        assert unknown <= set(BUILTIN_MODELS), f"{name}: unknown models in VIDGEN_MODEL_DEVICES: {unknown}"


# -- blobs --------------------------------------------------------------------------------------------------------
def blob_users(docs):
    """(workload, container) of every container running a stage or the gateway: the processes that use blobs."""
    for doc, container, argv in commands(docs):
        if argv[:2] in (["vidgen", "stage"], ["vidgen", "gateway"]):
            yield doc, container


def secret_refs(container: dict) -> dict[str, dict]:
    """Variable name → its secretKeyRef, for the container's env entries that take their value from a Secret."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env") or []
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_blob_settings_and_credentials_reach_every_stage_and_the_gateway(build):
    """The bucket comes from vidgen-settings, the keys from the Secret; processes that never open the blob store
    (`vidgen topics`, `vidgen autoscale`) get no credentials."""
    name, docs = build
    config = by_kind(docs, "ConfigMap")["vidgen-settings"]["data"]
    assert config["VIDGEN_BLOB_URL"].startswith("file:///" if name.endswith("+blobs-rwx") else "s3://"), name
    settings = load_settings(config)
    assert settings.blob_url == config["VIDGEN_BLOB_URL"]
    if name != "base":  # base's endpoint is a placeholder that never resolves: every overlay names a real one, or none
        assert not config.get("VIDGEN_BLOB_ENDPOINT", "").rstrip("/").endswith(".invalid"), f"{name}: placeholder"
    users = {(d["metadata"]["name"], c["name"]) for d, c in blob_users(docs)}
    assert {("gateway", "gateway"), ("gpu-agent", "gpu-agent"), ("vae-decoder", "vae-decoder")} <= users
    vidgen_containers = 0
    for doc, container, argv in commands(docs):
        if argv[:1] != ["vidgen"]:
            continue
        vidgen_containers += 1
        where = f"{name}: {doc['metadata']['name']}/{container['name']}"
        assert container_env(docs, container)["VIDGEN_BLOB_URL"] == config["VIDGEN_BLOB_URL"], where
        refs = {var: ref for var, ref in secret_refs(container).items() if ref["name"] == BLOB_SECRET}
        if (doc["metadata"]["name"], container["name"]) in users:
            assert {var: ref["key"] for var, ref in refs.items()} == BLOB_CREDENTIALS, where
            # Optional: with no Secret (keys from the AWS_* environment, or components/blobs-rwx) the pods still start.
            assert all(ref.get("optional") is True for ref in refs.values()), where
        else:
            assert not refs, f"{where} never opens the blob store: it gets no credentials"
    assert vidgen_containers > len(users) >= 9  # `vidgen topics` and `vidgen autoscale` exist and were checked


def test_no_secret_in_a_config_map_and_no_literal_secret(build):
    name, docs = build
    values = set()
    for secret in by_kind(docs, "Secret").values():
        values |= {str(v) for v in (secret.get("stringData") or {}).values()}
        values |= {base64.b64decode(v).decode() for v in (secret.get("data") or {}).values()}
    for config_map in by_kind(docs, "ConfigMap").values():
        for key, value in (config_map.get("data") or {}).items():
            where = f"{name}: ConfigMap {config_map['metadata']['name']} {key}"
            assert not SECRET_NAME.search(key), f"{where}: a secret's name in a ConfigMap"
            assert str(value) not in values, f"{where}: a Secret's value in a ConfigMap"
    for doc, pod in pod_specs(docs):
        for container in pod["containers"] + pod.get("initContainers", []):
            for entry in container.get("env") or []:
                if SECRET_NAME.search(entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), \
                        f"{name}: {doc['metadata']['name']}/{container['name']}: {entry['name']} is not from a Secret"
    if name.startswith("prod"):  # prod's keys are created out of band: a committed Secret would hold them in git
        assert BLOB_SECRET not in by_kind(docs, "Secret"), name


def test_a_file_blob_store_is_a_mounted_shared_volume(build):
    """Wherever VIDGEN_BLOB_URL is file:// (components/blobs-rwx) every stage and gateway container mounts a
    ReadWriteMany claim at that path, the prod gpu-agent pod's eight agent containers included; with s3:// no pod
    mounts the blob volume."""
    name, docs = build
    claims = by_kind(docs, "PersistentVolumeClaim")
    for doc, container in blob_users(docs):
        where = f"{name}: {doc['metadata']['name']}/{container['name']}"
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}
        url = urlparse(container_env(docs, container)["VIDGEN_BLOB_URL"])
        if url.scheme == "file":
            mounts = [m for m in container.get("volumeMounts", [])
                      if url.path == m["mountPath"] or url.path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts, f"{where}: nothing mounted at {url.path}: blobs would land in the container's own disk"
            mount = max(mounts, key=lambda m: len(m["mountPath"]))
            assert not mount.get("readOnly"), where
            claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
            assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{where}: every agent reads every checkpoint"
        else:
            assert url.scheme == "s3", where
            assert "blobs" not in volumes and "vidgen-blobs" not in claims, where


def test_images_of_others_are_pinned_to_a_release(build):
    name, docs = build
    for doc, pod in pod_specs(docs):
        for container in pod["containers"] + pod.get("initContainers", []):
            if list(container.get("command", []))[:1] == ["vidgen"]:
                continue  # the project's own image: tagged by the kustomization's images
            image = container["image"]
            match = re.fullmatch(r"[^:@]+(?::([\w][\w.-]*))?(?:@sha256:[0-9a-f]{64})?", image)
            assert match and (match.group(1) or "@" in image), f"{name}: {image} is not pinned"
            assert match.group(1) != "latest", f"{name}: {image} is not pinned"


def test_the_dev_object_store(overlay):
    """dev: a single-replica MinIO, marked as a development store, serves the endpoint and bucket vidgen-settings
    names with the credentials every stage reads; a Job creates the bucket. prod: none of it."""
    name, docs = overlay
    dev_store = [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "dev-object-store"]
    if name != "dev":
        assert not dev_store, f"{name}: the development object store is for dev only"
        return
    config = by_kind(docs, "ConfigMap")["vidgen-settings"]["data"]
    endpoint = urlparse(config["VIDGEN_BLOB_ENDPOINT"])
    service = by_kind(docs, "Service")[endpoint.hostname]
    assert service in dev_store
    port = next(p for p in service["spec"]["ports"] if p["port"] == endpoint.port)
    servers = [d for d, pod in pod_specs(docs) if d["kind"] == "Deployment"
               and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(servers) == 1 and servers[0] in dev_store and servers[0]["spec"]["replicas"] == 1
    minio = servers[0]["spec"]["template"]["spec"]["containers"][0]
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert port["targetPort"] in {p["name"] for p in minio["ports"]} | {p["containerPort"] for p in minio["ports"]}
    root = {var: (ref["name"], ref["key"]) for var, ref in secret_refs(minio).items()}
    assert root == {"MINIO_ROOT_USER": (BLOB_SECRET, "access_key_id"),
                    "MINIO_ROOT_PASSWORD": (BLOB_SECRET, "secret_access_key")}
    assert set(by_kind(docs, "Secret")[BLOB_SECRET]["stringData"]) == set(BLOB_CREDENTIALS.values())
    bucket = urlparse(config["VIDGEN_BLOB_URL"]).netloc
    scripts = [" ".join(argv) for d, _, argv in commands(docs) if d["kind"] == "Job" and d in dev_store]
    assert any(f"mc alias set dev {config['VIDGEN_BLOB_ENDPOINT']} " in script
               and f"mc mb --ignore-existing dev/{bucket}" in script for script in scripts), scripts
    # The endpoint is the cluster's: a browser could not follow a redirect to it.
    assert config["VIDGEN_BLOB_REDIRECT"] == "never"


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


def compose_default(value):
    """A compose value as it is with nothing set in the environment: ${NAME:-default} → default."""
    match = re.fullmatch(r"\$\{(\w+):?-(.*)\}", str(value))
    return match.group(2) if match else value


def test_compose_blob_store():
    """Every vidgen service has one and the same blob setting: the bucket in the compose MinIO, published on the
    endpoint's port (browsers follow the gateway's redirects there), its credentials MinIO's own and overridable
    from the shell; a one-shot creates the bucket before any stage starts."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    vidgen = {name: s for name, s in services.items() if (s.get("command") or [])[:1] == ["vidgen"]}
    blob_settings = {name: {k: v for k, v in s["environment"].items() if k.startswith("VIDGEN_BLOB_")}
                     for name, s in vidgen.items()}
    first = next(iter(blob_settings.values()))
    assert all(one == first for one in blob_settings.values()), "the vidgen services disagree on the blob store"
    env = {k: compose_default(v) for k, v in next(iter(vidgen.values()))["environment"].items()}
    settings = load_settings(env)
    url, endpoint = urlparse(settings.blob_url), urlparse(env["VIDGEN_BLOB_ENDPOINT"])
    assert url.scheme == "s3" and settings.blob_redirect == "never"  # the browser cannot resolve minio
    # Development credentials, overridable: the same variables feed MinIO's root user and vidgen.
    minio = services[endpoint.hostname]
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert first["VIDGEN_BLOB_ACCESS_KEY_ID"].startswith("${VIDGEN_BLOB_ACCESS_KEY_ID:-")
    assert first["VIDGEN_BLOB_SECRET_ACCESS_KEY"].startswith("${VIDGEN_BLOB_SECRET_ACCESS_KEY:-")
    assert minio["environment"]["MINIO_ROOT_USER"] == first["VIDGEN_BLOB_ACCESS_KEY_ID"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == first["VIDGEN_BLOB_SECRET_ACCESS_KEY"]
    assert f"{endpoint.port}:9000" in minio["ports"], "the endpoint's port is MinIO's, published on the host"
    # The bucket: a one-shot on MinIO's pinned client, after MinIO is healthy, before every service that uses blobs.
    makers = [name for name, s in services.items()
              if f"mc mb --ignore-existing dev/{url.netloc}" in " ".join(s.get("command") or [])]
    assert len(makers) == 1, makers
    maker = services[makers[0]]
    assert maker["restart"] == "no" and re.fullmatch(r"minio/mc:RELEASE\.[\w.-]+", maker["image"])
    assert f"mc alias set dev {env['VIDGEN_BLOB_ENDPOINT']} " in " ".join(maker["command"])
    assert maker["depends_on"][endpoint.hostname]["condition"] == "service_healthy"
    for name, service in vidgen.items():
        if name != "topics":  # registers schemas only
            assert service["depends_on"][makers[0]]["condition"] == "service_completed_successfully", name

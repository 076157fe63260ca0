"""deploy/k8s: schema-valid manifests that start each role the way the code expects.

Every manifest is validated offline against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships, strictly (an unknown field fails), for the oldest Kubernetes
the manifests target. The KEDA ScaledObject, a custom resource with no schema there, is
checked field by field against the settings it must agree with.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from stream_distill.bus.base import Topics
from stream_distill.cli import _parser
from stream_distill.config import ServeSettings, Settings
from stream_distill.registry.store import Registry
from stream_distill.serving.http import HttpServer, create_app
from stream_distill.serving.service import ServingCore

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
BASE = K8S / "base"
KUBE_VERSION = "1.30"
Doc = dict[str, Any]


def _yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def _base() -> tuple[Doc, ...]:
    kustomization = _yaml_docs(BASE / "kustomization.yaml")[0]
    return tuple(d for f in kustomization["resources"] for d in _yaml_docs(BASE / f))


def _get(kind: str, name: str) -> Doc:
    found = [d for d in _base() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads() -> list[Doc]:
    return [d for d in _base() if d["kind"] in {"Deployment", "StatefulSet", "Job"}]


def _container(workload: Doc) -> Doc:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _config() -> dict[str, str]:
    data: dict[str, str] = _get("ConfigMap", "sd-config")["data"]
    return data


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_kustomizations_list_every_manifest() -> None:
    kustomization = _yaml_docs(BASE / "kustomization.yaml")[0]
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == "stream-distill"
    images = {i["name"] for i in kustomization["images"]}
    assert {_container(w)["image"] for w in _workloads()} == images
    keda = _yaml_docs(K8S / "keda" / "kustomization.yaml")[0]
    assert keda["resources"][0] == "../base"
    assert all((K8S / "keda" / f).is_file() for f in keda["resources"][1:])


@pytest.mark.parametrize("doc", _base(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_passes_the_kubernetes_schema(doc: Doc) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    serve = yaml.safe_load(yaml.safe_dump(_get("Deployment", "sd-serve")))
    container = _container(serve)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(serve, KUBE_VERSION, strict=True)


def test_role_commands_parse_and_their_paths_are_mounted() -> None:
    claims = {d["metadata"]["name"] for d in _base() if d["kind"] == "PersistentVolumeClaim"}
    for workload in _workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        container = _container(workload)
        argv = container["command"]
        assert argv[0] == "stream-distill", name
        args = _parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
        serve_image = container["image"] == "stream-distill-serve"
        assert serve_image == (args.cmd == "serve"), f"{name}: only serve runs without torch"

        volumes = {v["name"]: v for v in pod["volumes"]}
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for mount in mounts.values():
            assert mount["name"] in volumes or mount["name"] in templates, f"{name}: {mount}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}"
        paths = (getattr(args, n, None) for n in ("teacher_dir", "registry", "data_dir", "out"))
        for path in paths:
            if path is not None:
                assert any(PurePosixPath(path).is_relative_to(m) for m in mounts), (
                    f"{name}: {path} is not on a volume"
                )

        # Non-root with a read-only image: /tmp and the cache volume (SD_DATA_DIR and HF_HOME
        # live there) are the only scratch, both emptyDir.
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
        for key in ("SD_DATA_DIR", "HF_HOME"):
            where = [m for m in mounts if PurePosixPath(_config()[key]).is_relative_to(m)]
            assert where and "emptyDir" in volumes[mounts[where[0]]["name"]], (name, key)


def test_serve_is_ready_on_the_v2_route_and_outlives_its_drain(tmp_path: Path) -> None:
    serve = _get("Deployment", "sd-serve")
    pod = serve["spec"]["template"]["spec"]
    container = _container(serve)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(_flag(container["command"], "--port"))
    ready = container["readinessProbe"]["httpGet"]
    live = container["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v2/health/ready", "http")
    assert (live["path"], live["port"]) == ("/v2/health/live", "http")
    app = create_app(ServingCore(Registry(tmp_path), ServeSettings()))
    routes = {getattr(r, "path", None) for r in app.routes}
    assert {ready["path"], live["path"], "/metrics"} <= routes

    # The drain, as the code bounds it: preStop sleep, uvicorn's graceful close, then the
    # request events still queued for Kafka.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    http_close = re.search(r"timeout_graceful_shutdown=(\d+)", inspect.getsource(HttpServer))
    assert http_close is not None, "HttpServer no longer sets timeout_graceful_shutdown"
    events = inspect.signature(ServingCore.aclose).parameters["drain_timeout_s"].default
    drain = pre_stop + int(http_close.group(1)) + events
    # 10 s more for the producer to flush what it holds and the process to exit.
    assert pod["terminationGracePeriodSeconds"] >= drain + 10

    service = _get("Service", "sd-serve")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    labels = serve["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        serve["spec"]["selector"]["matchLabels"],
        _get("PodDisruptionBudget", "sd-serve")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    hpa = _get("HorizontalPodAutoscaler", "sd-serve")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "sd-serve" and hpa["minReplicas"] >= 2
    assert "replicas" not in serve["spec"]  # the autoscaler owns it


def test_registry_is_one_shared_volume_the_trainer_writes_and_serve_reads() -> None:
    assert _get("PersistentVolumeClaim", "sd-registry")["spec"]["accessModes"] == ["ReadWriteMany"]

    def registry_mount(workload: Doc) -> tuple[str, bool]:
        pod = workload["spec"]["template"]["spec"]
        path = _flag(_container(workload)["command"], "--registry")
        (mount,) = [m for m in _container(workload)["volumeMounts"] if m["mountPath"] == path]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        return volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    assert registry_mount(_get("Deployment", "sd-serve")) == ("sd-registry", True)
    assert registry_mount(_get("StatefulSet", "sd-trainer")) == ("sd-registry", False)


def test_one_trainer_with_its_own_checkpoint_volume() -> None:
    trainer = _get("StatefulSet", "sd-trainer")
    assert trainer["spec"]["replicas"] == 1
    assert _get("Service", "sd-trainer")["spec"]["clusterIP"] == "None"
    assert trainer["spec"]["serviceName"] == "sd-trainer"
    (claim,) = trainer["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    data_dir = _flag(_container(trainer)["command"], "--data-dir")
    mounts = {m["mountPath"]: m["name"] for m in _container(trainer)["volumeMounts"]}
    assert mounts[data_dir] == claim["metadata"]["name"]
    hpas = [d for d in _base() if d["kind"] == "HorizontalPodAutoscaler"]
    assert "sd-trainer" not in {h["spec"]["scaleTargetRef"]["name"] for h in hpas}


def test_teachers_scale_within_the_consumer_group_and_its_partitions() -> None:
    config = _config()
    partitions = int(config["SD_KAFKA__PARTITIONS"])
    teacher = _get("Deployment", "sd-teacher")
    assert "replicas" not in teacher["spec"]
    assert _container(teacher)["envFrom"] == [{"configMapRef": {"name": "sd-config"}}]
    hpa = _get("HorizontalPodAutoscaler", "sd-teacher")["spec"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sd-teacher"}
    assert hpa["scaleTargetRef"] == target
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= partitions

    scaled = _yaml_docs(K8S / "keda" / "teacher-scaledobject.yaml")[0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "sd-teacher"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["SD_TEACHER__GROUP_ID"]
    assert meta["topic"] == Topics(config["SD_KAFKA__TOPIC_PREFIX"]).requests
    assert meta["bootstrapServers"] == config["SD_KAFKA__BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    keda = _yaml_docs(K8S / "keda" / "kustomization.yaml")[0]
    (patch,) = keda["patches"]
    assert patch["target"] == {"kind": "HorizontalPodAutoscaler", "name": "sd-teacher"}
    assert "$patch: delete" in patch["patch"]


def test_sd_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    names = set(_config())
    for workload in _workloads():
        names |= {e["name"] for e in _container(workload).get("env", [])}
    for name in sorted(n for n in names if n.startswith("SD_")):
        node: Any = Settings
        for part in name.removeprefix("SD_").lower().split("__"):
            assert part in node.model_fields, f"{name}: no setting {part!r}"
            node = node.model_fields[part].annotation
        monkeypatch.delenv(name, raising=False)
    for key, value in _config().items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # the values parse as the roles will parse them
    assert settings.kafka.bootstrap_servers == _config()["SD_KAFKA__BOOTSTRAP_SERVERS"]


def test_scrape_annotations_name_container_ports_and_alert_jobs() -> None:
    k8s_prom = yaml.safe_load((K8S.parent / "prometheus" / "prometheus-k8s.yml").read_text())
    relabel = k8s_prom["scrape_configs"][0]["relabel_configs"]
    (job_rule,) = [r for r in relabel if r.get("target_label") == "job"]
    component_label = "app.kubernetes.io/component"
    assert job_rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    jobs = set()
    for workload in _workloads():
        template = workload["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        ports = {p["containerPort"] for p in _container(workload).get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, workload["metadata"]["name"]
        component = template["metadata"]["labels"][component_label]
        jobs.add(job_rule["replacement"].replace("${1}", component))
    assert jobs == {"sd-serve", "sd-teacher", "sd-trainer"}
    alerts = (K8S.parent / "prometheus" / "alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', alerts)) <= jobs


def test_the_serve_image_installs_no_torch() -> None:
    """What `pip install .` pulls into the serve image: the base requirements, transitively."""
    heavy = {"torch", "transformers", "safetensors", "onnx"}
    seen: set[str] = set()
    todo = ["stream-distill"]
    while todo:
        dist = todo.pop()
        for line in importlib.metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = req.name.lower().replace("_", "-")
            if name not in seen:
                seen.add(name)
                todo.append(name)
    assert "onnxruntime" in seen and "fastapi" in seen
    assert not heavy & seen, heavy & seen

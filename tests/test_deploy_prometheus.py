"""deploy/prometheus, deploy/grafana and the compose file that runs them.

promtool comes from Debian's ``prometheus`` package (``make tools`` installs it). Where it
is missing the promtool tests skip, except under CI, where a missing promtool fails them.
Every metric that a rule, a test series or a dashboard panel names must be one that
:class:`PrometheusHooks` really exports, with its real label names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_distill.metrics.prometheus import PrometheusHooks

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream-distill.json"

PENDING = {"sd_online_accuracy": {"version"}}
"""Series the rules use before any hook exports them (alerts.yml says why)."""
SCRAPE_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""

_METRIC = re.compile(r"(?<![\w:])(sd_[a-z0-9_]+|sd:[a-z0-9_:]+|up)(?![\w:(])")
_SELECTOR = re.compile(r"(?<![\w:])(sd_[a-z0-9_]+|up)\{([^}]*)\}")
_MATCHER_KEY = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: `make tools` installs Debian's prometheus")
        pytest.skip("promtool not installed: run `make tools` (apt-get install prometheus)")
    return path


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the Prometheus hooks export, with its label names."""
    hooks = PrometheusHooks(CollectorRegistry())
    hooks.on_request("ok", 3.0, "v1")
    hooks.on_batch(4)
    hooks.on_swap("v2", 0.2, True)
    hooks.on_swap("v3", 0.1, False, "integrity: sha256 differs")
    hooks.on_model_serving("v2")
    hooks.on_event_dropped("queue full")
    hooks.on_feedback("accepted")
    hooks.on_dead_letter("sd.requests", "not JSON: ...")
    hooks.on_teacher_batch(8, 0.05)
    hooks.on_train_step({"kd": 0.4, "ce": 0.7}, 32, 0.1)
    hooks.on_publish("v4", True)
    hooks.on_publish("candidate", False)
    hooks.on_consumer_lag("trainer", 12)
    names: dict[str, set[str]] = {"up": set()}
    for family in hooks.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@cache
def _recorded_names() -> frozenset[str]:
    groups = _yaml(PROM / "alerts.yml")["groups"]
    return frozenset(r["record"] for g in groups for r in g["rules"] if "record" in r)


def _check_names(expr: str, where: str) -> None:
    """Metric names in ``expr`` are exported (or pending/recorded), its matchers real labels."""
    known = {**exported_metrics(), **PENDING}
    recorded = _recorded_names()
    for name in _METRIC.findall(expr):
        assert name in known or name in recorded, f"{where}: unknown metric {name}"
    for name, matchers in _SELECTOR.findall(expr):
        keys = set(_MATCHER_KEY.findall(matchers))
        unknown = keys - known[name] - SCRAPE_LABELS
        assert not unknown, f"{where}: {name} has no label {unknown}"


def test_the_hooks_export_the_sd_names_the_rules_are_written_against() -> None:
    names = exported_metrics()
    assert names["sd_requests_total"] == {"outcome"}
    assert names["sd_deadline_misses_total"] == set()
    assert names["sd_model_swap_failures_total"] == {"reason"}
    assert names["sd_dead_letters_total"] == {"topic", "reason"}
    assert names["sd_consumer_lag"] == {"role"}
    assert "le" in names["sd_request_latency_seconds_bucket"]


def test_scrape_configs_pass_promtool(promtool: str, tmp_path: Path) -> None:
    done = _promtool(promtool, "check", "config", PROM / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout + done.stderr

    # Debian builds Prometheus without Kubernetes discovery, so the k8s file is checked
    # (relabelling, rule files, everything else) with a static target in its place.
    k8s = _yaml(PROM / "prometheus-k8s.yml")
    (job,) = k8s["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [
        {"role": "pod", "namespaces": {"names": ["stream-distill"]}}
    ]
    job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    del job["kubernetes_sd_configs"]
    k8s["rule_files"] = [str(PROM / f) for f in k8s["rule_files"]]
    stand_in = tmp_path / "prometheus-k8s.yml"
    stand_in.write_text(yaml.safe_dump(k8s))
    done = _promtool(promtool, "check", "config", stand_in)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", PROM / "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _promtool(promtool, "test", "rules", PROM / "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_unit_tests_catch_a_loosened_rule(promtool: str, tmp_path: Path) -> None:
    rules = (PROM / "alerts.yml").read_text()
    threshold = "(rate(sd_requests_total[5m]))\n          > 0.01"
    assert rules.count(threshold) == 1  # the deadline-miss ratio
    loose = rules.replace(threshold, threshold.replace("0.01", "0.10"))
    (tmp_path / "alerts.yml").write_text(loose)
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    done = _promtool(promtool, "test", "rules", tmp_path / "alerts_test.yml")
    assert done.returncode != 0
    assert "alertname: SDDeadlineMisses" in done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {
        r["alert"] for g in _yaml(PROM / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r
    }
    assert {
        "SDDeadlineMisses",
        "SDAccuracyDrop",
        "SDTrainerLag",
        "SDModelSwapFailed",
        "SDDeadLetters",
    } <= alerts
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _yaml(PROM / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == alerts, f"never seen firing: {alerts - firing}"
    assert quiet == alerts, f"never seen quiet: {alerts - quiet}"


def test_rules_and_test_series_name_real_metrics_and_labels() -> None:
    for group in _yaml(PROM / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            _check_names(rule["expr"], rule.get("alert") or rule["record"])
    known = {**exported_metrics(), **PENDING}
    for case in _yaml(PROM / "alerts_test.yml")["tests"]:
        for series in case["input_series"]:
            name, _, labels = series["series"].partition("{")
            keys = set(_MATCHER_KEY.findall(labels))
            assert name in known, f"{case['name']}: unknown metric {name}"
            unknown = keys - known[name] - SCRAPE_LABELS
            assert not unknown, f"{case['name']}: {name} has no label {unknown}"


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, record name, PromQL with Grafana's variables filled in) per target."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$job", ".*")
            record = f"panel:p{panel['id']}_{target['refId']}"
            queries.append((panel["title"], record, expr))
    return queries


def test_dashboard_panels_show_real_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    for title, _, expr in _dashboard_queries():
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        _check_names(expr, title)
    shown = " ".join(expr for _, _, expr in _dashboard_queries())
    for name in ("sd_deadline_misses_total", "sd_consumer_lag", "sd_model_swap_failures_total"):
        assert name in shown


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    records = [{"record": record, "expr": expr} for _, record, expr in _dashboard_queries()]
    rules = tmp_path / "panels.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    done = _promtool(promtool, "check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(records)} rules found" in done.stdout


def test_compose_runs_prometheus_and_grafana_on_these_files() -> None:
    compose = _yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert "zookeeper" not in services
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft

    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = _yaml(PROM / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).is_file()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for role in ("serve", "teacher", "trainer"):
        (sd,) = jobs[f"sd-{role}"]["dns_sd_configs"]
        assert sd["names"] == [role] and role in services
    serve_cmd = services["serve"]["command"]
    serve_port = int(serve_cmd[serve_cmd.index("--port") + 1])
    assert jobs["sd-serve"]["dns_sd_configs"][0]["port"] == serve_port

    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = _yaml(GRAFANA / "provisioning" / "dashboards" / "stream-distill.yml")
    (p,) = provider["providers"]
    assert mounts["./grafana/dashboards"] == p["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).relative_to(p["options"]["path"])).is_file()
    (ds,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "9090:9090" in prometheus["ports"]


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        return subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60)

    done = check(DEPLOY / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "docker-compose.yml"
    text = (DEPLOY / "docker-compose.yml").read_text()
    broken.write_text(text.replace("stop_grace_period: 30s", "stop_grace_periods: 30s"))
    assert check(broken).returncode != 0  # the schema rejects what compose would

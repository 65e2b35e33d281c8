"""deploy/ checked by the tools that consume it: systemd-analyze, kubernetes-validate, promtool, and a real
Prometheus scraping a running daemon that evaluates every dashboard and rule expression."""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from lifelong.config import load_config
from lifelong.tools.broker import EmbeddedBroker, free_port
from lifelong.tools.generate import stream

from kafka_helpers import ThreadDaemon, config, http_get, produce, settings, wait_until

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def tool(name: str) -> str:
    path = shutil.which(name) or (
        str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None
    )
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def test_systemd_unit_verifies_and_outlasts_the_shutdown_grace(tmp_path):
    unit = (DEPLOY / "systemd" / "lifelong.service").read_text()
    installed = str(Path(sys.executable).parent / "lifelong")
    local = tmp_path / "lifelong.service"
    local.write_text(unit.replace("/opt/lifelong/venv/bin/lifelong", installed))
    out = subprocess.run([tool("systemd-analyze"), "verify", str(local)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert stop > load_config(ROOT / "config.yaml", env={}).shutdown_grace_s
    env = (DEPLOY / "systemd" / "lifelong.env.example").read_text()
    cfg = load_config(env=dict(line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#")))
    assert cfg.kafka.security_protocol == "SASL_SSL"


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for name in ("statefulset", "service", "pdb", "podmonitor", "secret.example"):
        docs[name] = yaml.safe_load((K8S / f"{name}.yaml").read_text())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generator = kustomization["configMapGenerator"][0]
    docs["configmap"] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"]},
        "data": {f: (K8S / f).read_text() for f in generator["files"]},
    }
    docs["statefulset-gpu"] = merge(docs["statefulset"], yaml.safe_load((K8S / "gpu" / "gpu-patch.yaml").read_text()))
    return docs


def merge(base, patch):
    """A strategic merge as kustomize does it for these manifests (lists of named items merge by name)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        out = copy.deepcopy(base)
        for item in patch:
            same = [i for i, b in enumerate(out) if b.get("name") == item["name"]]
            if same:
                out[same[0]] = merge(out[same[0]], item)
            else:
                out.append(item)
        return out
    return patch


def test_kubernetes_manifests_validate_strictly(tmp_path):
    docs = k8s_docs()
    files = []
    for name, doc in docs.items():
        if doc["kind"] == "PodMonitor":
            continue  # a CRD: kubernetes-validate has no schema for it (checked by hand below)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == len(files)


def test_kubernetes_workload_wiring(tmp_path):
    docs = k8s_docs()
    sts = docs["statefulset"]
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    cfg = load_config(env={})
    in_cluster = tmp_path / "config.yaml"
    in_cluster.write_text(docs["configmap"]["data"]["config.yaml"])
    cluster_cfg = load_config(in_cluster, env={})
    assert pod["spec"]["terminationGracePeriodSeconds"] > cluster_cfg.shutdown_grace_s
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert port == cluster_cfg.metrics.port and cluster_cfg.metrics.host == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == cluster_cfg.checkpoint.dir
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    secrets = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e]
    assert secrets and set(secrets) == {docs["secret.example"]["metadata"]["name"]}
    gpu = docs["statefulset-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "LIFELONG_ENGINE__DEVICE", "value": "auto"} in gpu["env"]
    labels = pod["metadata"]["labels"]
    for doc in (docs["service"], docs["pdb"]):
        assert doc["spec"]["selector"].get("matchLabels", doc["spec"]["selector"]).items() <= labels.items()
    monitor = docs["podmonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert cfg.engine.device == cluster_cfg.engine.device == "auto"


def test_promtool_checks_and_alert_unit_tests():
    promtool = tool("promtool")
    prom = DEPLOY / "prometheus"
    checks = (
        (["check", "rules", "rules/lifelong.rules.yml"], prom),
        (["check", "config", "prometheus.yml"], prom),
        (["test", "rules", "lifelong.test.yml"], prom / "tests"),
    )
    for args, cwd in checks:
        out = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (prom / "tests" / "lifelong.test.yml").read_text()))
    alerts = {
        r["alert"]
        for g in yaml.safe_load((prom / "rules" / "lifelong.rules.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert alerts == tested  # every alert has a unit test


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "lifelong.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "lifelong.rules.yml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_dashboard_has_the_variables_and_panels_on_call_needs():
    dash = json.loads((DEPLOY / "grafana" / "lifelong.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["task"]["type"] == "query"
    text = " ".join(e for _, e in dashboard_exprs())
    for needed in (
        "lifelong_consumer_lag",
        "lifelong_mistakes_total",
        "lifelong_task_regret_bound",
        "lifelong_kb_bytes",
        "lifelong_expert_weight",
        "lifelong_end_to_end_seconds_bucket",
        "lifelong_dead_letters_total",
        "lifelong_checkpoint_age_seconds",
    ):
        assert needed in text


@pytest.mark.slow
def test_real_prometheus_evaluates_every_expression_against_a_running_daemon(tmp_path):
    prometheus = tool("prometheus")
    with EmbeddedBroker(log=tmp_path / "tansu.log") as broker:
        cfg = config(
            settings(broker.bootstrap, tmp_path, shared=True, **{"engine.dim": 20, "checkpoint.interval_s": 1.0})
        )
        events = [json.dumps(e).encode() for e in stream("related", n_tasks=40, events=100, seed=3)]
        stop = threading.Event()

        def feed():
            rng = random.Random(0)
            for i in range(0, len(events), 200):
                if stop.is_set():
                    return
                chunk = events[i : i + 200]
                if rng.random() < 0.5:
                    chunk.append(b'{"task": "bad", "x": "not a vector"}')
                chunk.append(json.dumps({"task": "late", "id": f"l{i}", "x": [0.1] * 20, "ts": time.time()}).encode())
                chunk.append(json.dumps({"task": "late", "id": f"l{i}", "y": 1, "ts": time.time() + 2}).encode())
                produce(broker.bootstrap, cfg.kafka.events_topic, chunk)
                time.sleep(0.4)

        with ThreadDaemon(cfg) as daemon:
            wait_until(lambda: daemon.ready()[0], 30, what="daemon ready")
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            port = free_port()
            prom_cfg = tmp_path / "prometheus.yml"
            prom_cfg.write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(DEPLOY / "prometheus" / "rules" / "lifelong.rules.yml")],
                        "scrape_configs": [
                            {"job_name": "lifelong", "static_configs": [{"targets": [f"127.0.0.1:{cfg.metrics.port}"]}]}
                        ],
                    }
                )
            )
            log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed after the process
            args = [
                f"--config.file={prom_cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            proc = subprocess.Popen([prometheus, *args], stdout=subprocess.DEVNULL, stderr=log)
            try:
                wait_until(lambda: http_get(port, "/-/ready")[0] == 200, 30, what="prometheus ready")

                def query(expr: str) -> dict:
                    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                    try:
                        with urllib.request.urlopen(url, timeout=10) as r:
                            return json.loads(r.read())
                    except urllib.error.HTTPError as e:
                        return json.loads(e.read())

                def scrapes() -> float:
                    res = query('count_over_time(lifelong_ready{job="lifelong"}[1m])')["data"]["result"]
                    return float(res[0]["value"][1]) if res else 0.0

                wait_until(lambda: scrapes() >= 5, 60, interval=0.5, what="scrapes")
                empty = []
                for title, expr in dashboard_exprs():
                    concrete = expr.replace("$__rate_interval", "10s").replace("$task", ".*")
                    out = query(concrete)
                    assert out["status"] == "success", (title, expr, out)
                    values = [s["value"][1] for s in out["data"]["result"]]
                    if not any(v not in ("NaN", "+Inf", "-Inf") for v in values):
                        empty.append((title, expr))
                assert not empty, f"panels without data: {empty}"
                for expr in rule_exprs():
                    out = query(expr)
                    assert out["status"] == "success", (expr, out)
                _, body = http_get(cfg.metrics.port, "/metrics")
            finally:
                stop.set()
                proc.terminate()
                proc.wait(10)
                log.close()
    exported = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("lifelong_")}
    used = set()
    for text in (
        [e for _, e in dashboard_exprs()]
        + rule_exprs()
        + [(DEPLOY / "prometheus" / "tests" / "lifelong.test.yml").read_text()]
    ):
        used |= set(re.findall(r"\blifelong_[a-z_]+", text))
    assert used and used <= exported, f"names not exported by the daemon: {sorted(used - exported)}"

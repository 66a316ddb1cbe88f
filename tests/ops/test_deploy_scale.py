"""The scaled deployment as shipped (deploy/scale/): the compose file, nginx's and Prometheus'
configs and the proxy's config agree with each other and pass their own tools' checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.gateway import ROOT
from tests.support.procs import require_tool

SCALE = ROOT / "deploy" / "scale"


def load(name: str) -> Any:
    return yaml.safe_load((SCALE / name).read_text())


def test_compose_runs_three_replicas_on_redis_and_postgres_behind_nginx():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"proxy", "nginx", "redis", "postgres", "prometheus", "grafana"}
    proxy = services["proxy"]
    assert proxy["deploy"]["replicas"] == 3
    assert "ports" not in proxy  # only nginx is published: clients never reach one replica directly
    assert services["nginx"]["ports"] == ["8080:8080"]
    assert set(proxy["depends_on"]) == {"redis", "postgres"}
    env = proxy["environment"]
    assert env["ORPROXY_REDIS_URL"].startswith("redis://redis:")
    assert env["ORPROXY_LEDGER_DSN"].startswith("postgresql://") and "@postgres:5432/" in env["ORPROXY_LEDGER_DSN"]
    for service in services.values():  # every file a service mounts is in the repository
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (SCALE / source).resolve().exists(), f"{source} (mounted by compose) is missing"
    # The dashboards are the single-process ones: they sum across replicas as they stand.
    assert "../../grafana/dashboards:/etc/grafana/dashboards/orproxy:ro" in services["grafana"]["volumes"]


def test_the_scaled_config_passes_orproxy_check_and_names_the_compose_variables():
    config = load("config.yaml")
    assert config["state"] == {"backend": "redis", "url_env": "ORPROXY_REDIS_URL", "on_state_error": "fail_closed"}
    assert (config["ledger"]["backend"], config["ledger"]["dsn_env"]) == ("postgres", "ORPROXY_LEDGER_DSN")
    env = load("docker-compose.yml")["services"]["proxy"]["environment"]
    for name in (config["state"]["url_env"], config["ledger"]["dsn_env"], config["metrics"]["key_env"]):
        assert name in env
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(SCALE / "config.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_replica_and_passes_promtool(tmp_path):
    promtool = require_tool("promtool", "prometheus")
    config = load("prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["dns_sd_configs"] == [{"names": ["proxy"], "type": "A", "port": 8080, "refresh_interval": "15s"}]
    secret = job["authorization"]["credentials_file"]
    assert secret == "/run/secrets/orproxy-metrics-key"
    assert "orproxy-metrics-key" in load("docker-compose.yml")["services"]["prometheus"]["secrets"]
    key = tmp_path / "key"
    key.write_text("k")
    local = tmp_path / "prometheus.yml"
    local.write_text((SCALE / "prometheus.yml").read_text().replace(secret, str(key)))
    checked = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_nginx_conf_passes_nginx_t(tmp_path):
    nginx = require_tool("nginx", "nginx-light")
    # `proxy` resolves inside compose only; the syntax and every directive are what nginx checks here.
    text = (SCALE / "nginx.conf").read_text().replace("server proxy:8080", "server 127.0.0.1:8080")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n" + text)
    checked = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "proxy_buffering off" in text  # streams are relayed as they arrive
    assert Path(conf).read_text().count("upstream orproxy") == 1

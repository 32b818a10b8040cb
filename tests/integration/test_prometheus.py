"""contrib/prometheus and contrib/grafana against promtool, a real Prometheus and the real exporter.

The promtool tests check the shipped files as an operator would. The live
tests run the installed ``virt-balloon-stats exporter`` on a guest of their
own and a real ``prometheus`` loaded with the shipped ``prometheus.yml``
(only its intervals shortened to 1 s), the shipped rule files and a
``targets/*.yml`` naming that exporter. Then every rule and every dashboard
query is sent to Prometheus' HTTP API: each must parse, each metric and
label it names must exist in what the exporter serves, and each one that
should have data on a healthy guest must return some. Last, the guest's
polling is turned off and the exporter stopped, and the matching alerts
must go pending with the guest's and the hypervisor's labels.

Under ``CI=true`` a missing ``prometheus`` or ``promtool`` fails the tests;
elsewhere they are skipped with the package to install.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from tests.ci import unavailable
from tests.integration.conftest import ROOT, URI, Connection, Domains, wait_for

PROMETHEUS_DIR = ROOT / "contrib" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = tuple(
    PROMETHEUS_DIR / name for name in ("recording-rules.yml", "advice-rules.yml", "alert-rules.yml")
)
RULE_TESTS = PROMETHEUS_DIR / "tests" / "alert-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "virt-balloon-stats.json"
CLI = shutil.which("virt-balloon-stats") or str(Path(sys.executable).parent / "virt-balloon-stats")
JOB = "virt-balloon-stats"

#: The advice the exporter serves and the test asks for: a minute of history is enough.
ADVICE = ("--window", "1h", "--min-history", "60s")

#: Metrics a healthy testbed legitimately has no sample of, with their labels
#: (metrics.py): the exporter adds an error kind at its first error. It must
#: still declare them (``# TYPE``), so a misspelt name is never excused.
MAY_BE_EMPTY = {"virt_balloon_errors_total": {"kind"}}

#: Grafana's own variables, and what they become here (scrapes every second).
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

#: A metric this package names, a recording rule (level:virt_balloon_...:ops), or Prometheus' ``up``.
_METRIC = r"(?:[a-z_]+:)?virt_balloon_[a-z0-9_]+(?::[a-z0-9_]+)?|(?<![\w:])up(?![\w:(])"
_SELECTOR = re.compile(rf"(?<![\w:])({_METRIC})(\{{[^}}]*\}})?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RATE_ARG = re.compile(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)")
_TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``: fail under CI, else skip, when missing."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found; install it: apt-get install prometheus")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Loopback only: never through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10) -> Tuple[int, bytes]:
    """(HTTP status, body); status 0 when nothing answers."""
    try:
        with _HTTP.open(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err).encode()


# -- what the shipped files say ------------------------------------------------


def rule_names(kind: str) -> List[str]:
    """``alert`` or ``record`` names, in file order, from the shipped rule files."""
    pattern = re.compile(rf"^\s*- {kind}:\s*(\S+)\s*$", re.M)
    return [name for path in RULE_FILES for name in pattern.findall(path.read_text())]


def alert_rule_cases() -> Dict[str, Set[bool]]:
    """For each alertname in the promtool tests: whether it is shown firing (True) and not (False)."""
    cases: Dict[str, Set[bool]] = {}
    name: Optional[str] = None
    for line in RULE_TESTS.read_text().splitlines():
        found = re.match(r"\s*alertname:\s*(\S+)\s*$", line)
        if found:
            name = found.group(1)
            continue
        found = re.match(r"\s*exp_alerts:\s*(\[\])?\s*$", line)
        if found and name is not None:
            cases.setdefault(name, set()).add(found.group(1) is None)
            name = None
    return cases


def dashboard_targets(dashboard: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(panel title, target) for every query target, rows' collapsed panels included."""
    def walk(panels: List[Dict[str, Any]]) -> Iterator[Tuple[str, Dict[str, Any]]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel.get("title", "?"), target
            yield from walk(panel.get("panels", []))

    return walk(dashboard["panels"])


def substitute(expr: str, values: Dict[str, str]) -> str:
    """Replace ``$var`` and ``${var}``; a variable the dashboard does not define fails the test."""
    def one(match: "re.Match[str]") -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"undefined dashboard variable ${name} in {expr}"
        return values[name]

    return _VARIABLE.sub(one, expr)


def selectors(expr: str) -> List[Tuple[str, str]]:
    """(metric name, full selector) for every series selector of a known metric in ``expr``."""
    return [(m.group(1), m.group(1) + (m.group(2) or "")) for m in _SELECTOR.finditer(expr)]


def label_names(expr: str) -> Set[str]:
    """Labels named in grouping clauses and in matchers."""
    names = set()
    for clause in _GROUPING.findall(expr):
        names.update(n.strip() for n in clause.split(",") if n.strip())
    for _, selector in selectors(expr):
        names.update(_MATCHER_LABEL.findall(selector[selector.find("{"):] if "{" in selector else ""))
    return names


def test_metric_extraction_sees_what_it_must() -> None:
    """The helpers the live tests rely on, on the shapes the shipped files use."""
    expr = (
        'sum without (domain, uuid) (domain:virt_balloon_used_memory_bytes) and ignoring(status) '
        'max_over_time(virt_balloon_status{status="ok"}[1h]) == 1 or absent(up{job="virt-balloon-stats"})'
    )
    assert selectors(expr) == [
        ("domain:virt_balloon_used_memory_bytes", "domain:virt_balloon_used_memory_bytes"),
        ("virt_balloon_status", 'virt_balloon_status{status="ok"}'),
        ("up", 'up{job="virt-balloon-stats"}'),
    ]
    assert label_names(expr) == {"domain", "uuid", "status", "job"}
    assert _RATE_ARG.findall("rate(virt_balloon_major_faults_total{a=\"b\"}[5m])") == [
        "virt_balloon_major_faults_total"
    ]
    values = {"instance": "h", "__rate_interval": "1m"}
    assert substitute('x{i=~"$instance"}[$__rate_interval]', values) == 'x{i=~"h"}[1m]'


# -- promtool on the shipped files ---------------------------------------------


def test_promtool_check_config() -> None:
    proc = promtool("check", "config", CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in proc.stdout, proc.stdout


def test_promtool_check_rules() -> None:
    for path in RULE_FILES:
        proc = promtool("check", "rules", str(path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rules = len(re.findall(r"^\s*- (?:record|alert):", path.read_text(), re.M))
        assert f"SUCCESS: {rules} rules found" in proc.stdout, (path.name, proc.stdout)


def test_promtool_test_rules() -> None:
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_tests_cover_every_alert_both_ways() -> None:
    """Each alert has a promtool case where it fires and one where it does not; each record is evaluated."""
    cases = alert_rule_cases()
    for alert in rule_names("alert"):
        assert cases.get(alert) == {True, False}, f"{alert}: cases {cases.get(alert)}"
    assert set(cases) <= set(rule_names("alert")), "tests name an alert the rules do not have"
    tested = set(re.findall(r"^\s*- expr:\s*([\w:]+)", RULE_TESTS.read_text(), re.M))
    assert tested == set(rule_names("record"))


# -- the live stack ------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    """Two guests (one idle, one holding 100 MiB), the exporter reading only them and keeping their
    history, and Prometheus scraping that exporter every second."""

    domain: str
    hog: str
    history: Path
    uuid: str
    instance: str
    prometheus_url: str
    exporter: "subprocess.Popen[bytes]"
    exporter_types: Dict[str, str]

    def api(self, path: str, **params: str) -> Dict[str, Any]:
        url = f"{self.prometheus_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        assert status, f"prometheus does not answer: {body.decode()}"
        doc = json.loads(body)
        assert isinstance(doc, dict)
        return doc

    def query(self, expr: str) -> List[Dict[str, Any]]:
        """The result of an instant query; fails the test with Prometheus' error when it does not parse."""
        doc = self.api("query", query=expr)
        assert doc.get("status") == "success", f"{expr}: {doc.get('errorType')}: {doc.get('error')}"
        result = doc["data"]["result"]
        assert isinstance(result, list)
        return result

    def count(self, expr: str) -> int:
        result = self.query(f"count({expr})")
        return int(float(result[0]["value"][1])) if result else 0

    def alerts(self) -> List[Dict[str, Any]]:
        doc = self.api("alerts")
        assert doc["status"] == "success", doc
        return list(doc["data"]["alerts"])


def _stop(proc: Optional["subprocess.Popen[bytes]"]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _prometheus_config(workdir: Path, exporter: str) -> Path:
    """The shipped config, rules and file-SD layout, scraping ``exporter`` every second."""
    text, changed = re.subn(
        r"^(\s*(?:scrape|evaluation)_interval:\s*)15s\s*$", r"\g<1>1s", CONFIG.read_text(), flags=re.M
    )
    assert changed == 2, "prometheus.yml no longer sets scrape_interval and evaluation_interval to 15s"
    config = workdir / "prometheus.yml"
    config.write_text(text)
    for path in RULE_FILES:
        # A group's own interval (the advice's minute) goes to a second as well.
        text = re.sub(r"^(\s*interval:\s*)1m\s*$", r"\g<1>1s", path.read_text(), flags=re.M)
        (workdir / path.name).write_text(text)
    (workdir / "targets").mkdir()
    (workdir / "targets" / "testbed.yml").write_text(f'- targets: ["{exporter}"]\n')
    return config


def _exporter_types(url: str) -> Dict[str, str]:
    status, body = http_get(url)
    assert status == 200, body[:200]
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), re.M))


def _evaluated_since(stack: Stack, since: float) -> bool:
    """Whether every rule group was last evaluated after ``since`` (epoch seconds)."""
    groups = stack.api("rules")["data"]["groups"]
    for group in groups:
        # RFC 3339 with nanoseconds; fromisoformat takes at most microseconds before Python 3.11.
        stamp = re.sub(r"(\.\d{6})\d*", r"\1", group["lastEvaluation"]).replace("Z", "+00:00")
        if datetime.datetime.fromisoformat(stamp).timestamp() < since:
            return False
    return bool(groups)


@pytest.fixture(scope="module")
def stack(libvirt_conn: Connection) -> Iterator[Stack]:
    prometheus_bin = tool("prometheus")
    domains = Domains()
    workdir = Path(tempfile.mkdtemp(prefix="vbs-prom-"))
    exporter: Optional["subprocess.Popen[bytes]"] = None
    prometheus: Optional["subprocess.Popen[bytes]"] = None
    try:
        # 384 MiB each: <memory> caps no recommendation, even one widened by half for a short history.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            idle = pool.submit(domains.create, "virtio", "prom", "--memory", "384", wait_stats=True)
            hog = pool.submit(domains.create, "virtio", "prom-hog", "--memory", "384", "--hog", "100",
                              wait_stats=True)
            domain, hog_domain = idle.result(), hog.result()

        exporter_port = free_port()
        instance = f"127.0.0.1:{exporter_port}"
        exporter_log = workdir / "exporter.log"
        with exporter_log.open("wb") as log:
            exporter = subprocess.Popen(
                [CLI, "exporter", "-c", URI, "--listen", instance, "--interval", "1", domain, hog_domain,
                 "--history", str(workdir / "history.sqlite"), "--advise-every", "2s", *ADVICE],
                stdout=log, stderr=subprocess.STDOUT,
            )
        metrics_url = f"http://{instance}/metrics"

        def exporter_serves_domain() -> bool:
            assert exporter is not None and exporter.poll() is None, f"exporter exited: {_log(exporter_log)}"
            status, body = http_get(metrics_url, timeout=2)
            return status == 200 and f'domain="{domain}",status="ok"'.encode() in body

        wait_for(exporter_serves_domain, timeout=30, what="the exporter to serve the guest")

        prometheus_port = free_port()
        config = _prometheus_config(workdir, instance)
        prometheus_log = workdir / "prometheus.log"
        with prometheus_log.open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )
        result = Stack(
            domain=domain,
            hog=hog_domain,
            history=workdir / "history.sqlite",
            uuid=libvirt_conn.get().lookupByName(domain).UUIDString(),
            instance=instance,
            prometheus_url=f"http://127.0.0.1:{prometheus_port}",
            exporter=exporter,
            exporter_types=_exporter_types(metrics_url),
        )

        def prometheus_ready() -> bool:
            assert prometheus is not None and prometheus.poll() is None, (
                f"prometheus exited: {_log(prometheus_log)}"
            )
            return http_get(f"{result.prometheus_url}/-/ready", timeout=2)[0] == 200

        wait_for(prometheus_ready, timeout=30, what="prometheus to be ready")
        scrapes = f'sum_over_time(up{{job="{JOB}", instance="{instance}"}}[1m])'
        wait_for(
            lambda: any(float(s["value"][1]) >= 5 for s in result.query(scrapes)),
            timeout=30, what="five successful scrapes of the exporter",
        )
        since = time.time()
        wait_for(lambda: _evaluated_since(result, since + 1), timeout=15, what="the rules to be evaluated")
        yield result
    finally:
        _stop(prometheus)
        _stop(exporter)
        domains.destroy_all()
        shutil.rmtree(workdir, ignore_errors=True)


def assert_names_exist(stack: Stack, expr: str, where: str, known_labels: Set[str]) -> None:
    """Every metric and label ``expr`` names exists; every selector has data unless excused."""
    found = selectors(expr)
    assert found, f"{where}: no metric of this package in {expr}"
    for name, selector in found:
        if name in MAY_BE_EMPTY:
            assert stack.exporter_types.get(name) == "counter", f"{where}: the exporter declares no {name}"
            known_labels = known_labels | MAY_BE_EMPTY[name]
            continue
        if name.startswith("virt_balloon_"):
            assert name in stack.exporter_types, f"{where}: the exporter serves no {name}"
        assert stack.count(selector) > 0, f"{where}: {selector} has no series"
    for name in _RATE_ARG.findall(expr):
        if name.startswith("virt_balloon_"):
            assert stack.exporter_types.get(name) == "counter", f"{where}: rate() over the gauge {name}"
    unknown = label_names(expr) - known_labels
    assert not unknown, f"{where}: no series has the label(s) {sorted(unknown)}"


def known_labels(stack: Stack) -> Set[str]:
    doc = stack.api("labels", **{"match[]": f'{{job="{JOB}"}}'})
    assert doc["status"] == "success", doc
    return set(doc["data"])


def loaded_rules(stack: Stack, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The rules Prometheus loaded, in file order; only ``recording`` or ``alerting`` ones with ``kind``."""
    groups = stack.api("rules")["data"]["groups"]
    return [r for g in groups for r in g["rules"] if kind is None or r["type"] == kind]


def test_rules_load_and_evaluate_without_error(stack: Stack) -> None:
    rules = loaded_rules(stack)
    # Prometheus lists the groups by file name, each in file order.
    assert sorted(r["name"] for r in rules if r["type"] == "recording") == sorted(rule_names("record"))
    assert sorted(r["name"] for r in rules if r["type"] == "alerting") == sorted(rule_names("alert"))
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


def test_recording_rules_query_real_metrics(stack: Stack) -> None:
    labels = known_labels(stack)
    for rule in loaded_rules(stack, "recording"):
        where = f"record {rule['name']}"
        assert stack.query(rule["query"]), f"{where}: {rule['query']} returns nothing on a healthy guest"
        assert stack.count(rule["name"]) > 0, f"{where}: nothing recorded"
        assert_names_exist(stack, rule["query"], where, labels)


def test_alert_rules_query_real_metrics(stack: Stack) -> None:
    labels = known_labels(stack)
    for rule in loaded_rules(stack, "alerting"):
        where = f"alert {rule['name']}"
        stack.query(rule["query"])  # parses
        assert_names_exist(stack, rule["query"], where, labels)
        assert rule["labels"].get("severity") in ("critical", "warning"), where
        templated = set()
        for key in ("summary", "description"):
            assert rule["annotations"].get(key), f"{where}: no {key}"
            templated.update(_TEMPLATE_LABEL.findall(rule["annotations"][key]))
        assert templated <= labels, f"{where}: annotations use missing label(s) {templated - labels}"
        carried = set()
        for _, selector in selectors(rule["query"]):
            carried.update(label for series in stack.query(selector) for label in series["metric"])
        missing = ({"instance", "uri", "domain"} & carried) - templated
        assert not missing, f"{where}: annotations do not say which {sorted(missing)}"


def test_dashboard_queries_real_metrics(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    values = dict(GRAFANA_BUILTINS, datasource="prometheus", instance=stack.instance, domain=stack.domain)
    labels = known_labels(stack)

    for name in ("instance", "domain"):
        definition = substitute(variables[name]["query"]["query"], values)
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert found, f"${name}: {definition}"
        selector, label = found.groups()
        assert_names_exist(stack, selector, f"variable ${name}", labels)
        seen = {s["metric"].get(label) for s in stack.query(f"count by ({label}) ({selector})")}
        assert values[name] in seen, f"${name}: {definition} lists {seen}"

    targets = list(dashboard_targets(dashboard))
    assert len(targets) >= 10
    for title, target in targets:
        assert target["datasource"]["uid"] == "${datasource}", title
        expr = substitute(target["expr"], values)
        where = f"panel {title!r} {target['refId']}"
        result = stack.query(expr)
        assert_names_exist(stack, expr, where, labels)
        if not any(name in MAY_BE_EMPTY for name, _ in selectors(expr)):
            assert result, f"{where}: {expr} returns nothing on a healthy guest"
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            for series in result:
                assert label in series["metric"], f"{where}: no {label} for its legend: {series}"


def _advise(stack: Stack, *source: str) -> Dict[str, Dict[str, Any]]:
    proc = subprocess.run(
        [CLI, "advise", "-c", URI, *source, *ADVICE, "--format", "json", stack.domain, stack.hog],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return {doc["domain"]: doc for doc in json.loads(proc.stdout)}


def test_advice_from_the_history_file_and_from_prometheus_agree(stack: Stack) -> None:
    """The same guests advised from the exporter's history file and from Prometheus: within 5 %.

    Both are the installed ``advise``; one reads the file the exporter keeps
    (``--history``), the other PromQL over what Prometheus scraped from the
    same exporter (``--prometheus``). The exporter serves the advice it makes
    from its file too, and Prometheus has scraped it.
    """
    names = (stack.domain, stack.hog)
    both: Dict[str, Dict[str, Dict[str, Any]]] = {}

    def advised() -> bool:
        both["history"] = _advise(stack, "--history", str(stack.history))
        both["prometheus"] = _advise(stack, "--prometheus", stack.prometheus_url)
        return all(both[kind][name]["recommended"] is not None for kind in both for name in names)

    wait_for(advised, timeout=180, what="a minute of usable history in the file and in Prometheus")
    for name in names:
        by_file, by_prometheus = both["history"][name], both["prometheus"][name]
        for key in ("recommended", "demand", "reclaimable"):
            assert by_prometheus[key] == pytest.approx(by_file[key], rel=0.05), (key, by_file, by_prometheus)
        assert by_prometheus["actual"] == by_file["actual"] == 384 * 2**20
    hog, idle = both["history"][stack.hog], both["history"][stack.domain]
    assert hog["demand"] >= 100 * 2**20 > idle["demand"], (hog, idle)
    assert idle["reclaimable"] > 0, idle

    # The exporter advises every 2 s and Prometheus scrapes every second: its advice may lag the command's.
    served: Dict[str, float] = {}

    def scraped() -> bool:
        served.clear()
        for series in stack.query(f'virt_balloon_recommended_bytes{{instance="{stack.instance}"}}'):
            served[series["metric"]["domain"]] = float(series["value"][1])
        return set(served) == set(names)

    wait_for(scraped, timeout=30, what="Prometheus to scrape the exporter's advice for both guests")
    for name in names:
        assert served[name] == pytest.approx(both["history"][name]["recommended"], rel=0.05), (name, served)
    confidence = stack.query(f'virt_balloon_advice_confidence{{domain="{stack.hog}"}}')
    assert len(confidence) == 1 and 0 < float(confidence[0]["value"][1]) <= 1, confidence


def test_healthy_guest_raises_no_alert(stack: Stack) -> None:
    assert stack.count(f'virt_balloon_status{{domain="{stack.domain}", status="ok"}} == 1') == 1
    assert stack.alerts() == []


def _alert(stack: Stack, name: str) -> Optional[Dict[str, Any]]:
    for alert in stack.alerts():
        if alert["labels"]["alertname"] == name:
            return alert
    return None


def test_alerts_follow_the_guest_and_the_exporter(stack: Stack) -> None:
    """Polling turned off goes pending with the guest's labels; so does the exporter going away.

    Changes the stack: runs last.
    """
    proc = subprocess.run(
        [CLI, "disable", "-c", URI, stack.domain], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: _alert(stack, "VirtBalloonPollingDisabled") is not None, timeout=30,
             what="VirtBalloonPollingDisabled to go pending")
    alert = _alert(stack, "VirtBalloonPollingDisabled")
    assert alert is not None
    assert alert["state"] == "pending"  # for: 5m
    assert alert["labels"] == {
        "alertname": "VirtBalloonPollingDisabled",
        "severity": "warning",
        "job": JOB,
        "instance": stack.instance,
        "uri": URI,
        "domain": stack.domain,
        "uuid": stack.uuid,
        "status": "polling_disabled",
    }
    assert stack.domain in alert["annotations"]["summary"]
    assert f"{URI} on {stack.instance}" in alert["annotations"]["description"]
    assert [a["labels"]["alertname"] for a in stack.alerts()] == ["VirtBalloonPollingDisabled"]

    _stop(stack.exporter)
    wait_for(lambda: _alert(stack, "VirtBalloonExporterDown") is not None, timeout=30,
             what="VirtBalloonExporterDown to go pending")
    alert = _alert(stack, "VirtBalloonExporterDown")
    assert alert is not None
    assert alert["state"] == "pending"
    assert alert["labels"] == {"alertname": "VirtBalloonExporterDown", "severity": "warning", "job": JOB,
                               "instance": stack.instance}

#!/usr/bin/env bash
# Validates the deployment artifacts that cannot run on this machine (no Docker engine, no
# Kubernetes, no ClickHouse cluster), offline, and exits non-zero on any problem:
#   a) deploy/compose/docker-compose.yml against the compose-spec JSON schema (shipped in the
#      docker-compose 1.29.2 PyPI package), plus references: depends_on targets and conditions,
#      named volumes, networks, bind-mounted files, health checks, build context, variable
#      defaults, and the stack's eventflow.toml / prometheus.yml against the services;
#   b) deploy/k8s/*.yaml with kubernetes-validate (--strict, Kubernetes 1.30 and the newest
#      bundled version), plus probes, resource requests, processor replicas <= kafka.partitions,
#      selectors and references;
#   c) sql/cluster/*.sql on a current ClickHouse (chdb): every statement parses, every T_local
#      has the columns, ORDER BY and version column of the single-node T, sharding keys keep a
#      row key on one shard, and the DDL (ON CLUSTER removed, engines made non-replicated) runs
#      against a local cluster with INSERTs through the Distributed tables read back with FINAL;
#   d) deploy/Dockerfile structure; the EventFlow configurations with the eventflow binary when
#      it is built; promtool check config on the Prometheus configurations.
# Called by scripts/test.sh; also runs on its own: bash scripts/validate_deploy.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO"

VALIDATE_CACHE="$EVENTFLOW_CACHE/validate"
mkdir -p "$VALIDATE_CACHE"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

pip_install() {
  python3 -m pip install --quiet "$@" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "$@"
}

# module name -> requirement
ensure_module() {
  python3 -c "import $1" >/dev/null 2>&1 && return
  log "installing $2 (pip)"
  pip_install "$2" || die "could not install $2"
  python3 -c "import $1" >/dev/null 2>&1 || die "$2 installed but 'import $1' fails"
}

ensure_module yaml PyYAML
ensure_module jsonschema "jsonschema>=4.18"
ensure_module kubernetes_validate "kubernetes-validate>=1.30"
ensure_module dockerfile_parse dockerfile-parse
ensure_module chdb chdb
python3 -c 'import tomllib' >/dev/null 2>&1 || ensure_module tomli tomli

# The compose-spec schema: docker-compose 1.29.2 (the last Python release, maintained by Docker)
# ships it as compose/config/compose_spec.json. Installed without dependencies into the cache,
# so it does not touch the Python environment.
COMPOSE_PKG="$VALIDATE_CACHE/docker-compose-1.29.2"
COMPOSE_SCHEMA="$COMPOSE_PKG/compose/config/compose_spec.json"
if [ ! -s "$COMPOSE_SCHEMA" ]; then
  log "fetching the compose-spec schema (docker-compose 1.29.2 from PyPI, no dependencies)"
  rm -rf "$COMPOSE_PKG"
  pip_install --no-deps --target "$COMPOSE_PKG" docker-compose==1.29.2 \
    || die "could not install docker-compose==1.29.2"
  [ -s "$COMPOSE_SCHEMA" ] || die "docker-compose 1.29.2 has no compose/config/compose_spec.json"
fi

# The eventflow binary (built by scripts/test.sh) checks the configuration files for real.
EVENTFLOW_BIN=""
for b in "$CARGO_TARGET_DIR/debug/eventflow" "$CARGO_TARGET_DIR/release/eventflow"; do
  if [ -x "$b" ]; then EVENTFLOW_BIN="$b"; break; fi
done

PROMTOOL="$(command -v promtool || true)"

log "validating deploy/ and sql/cluster/"
python3 - "$REPO" "$COMPOSE_SCHEMA" "$EVENTFLOW_BIN" "$PROMTOOL" <<'PY'
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

REPO, COMPOSE_SCHEMA, EVENTFLOW_BIN, PROMTOOL = sys.argv[1:5]
os.chdir(REPO)

problems = []
checks = 0


def fail(section, msg):
    problems.append(f"{section}: {msg}")
    print(f"  FAIL {section}: {msg}", flush=True)


def ok(section, msg):
    global checks
    checks += 1
    print(f"  ok   {section}: {msg}", flush=True)


def check(cond, section, msg_ok, msg_fail):
    if cond:
        ok(section, msg_ok)
    else:
        fail(section, msg_fail)
    return cond


def eventflow_config_check(section, toml_text, env):
    """Loads a configuration with the real binary (unknown keys and bad values fail)."""
    if not EVENTFLOW_BIN:
        print(f"  skip {section}: eventflow binary not built; configuration checked as TOML only")
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "eventflow.toml")
        with open(path, "w") as f:
            f.write(toml_text)
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith("EVENTFLOW__") and k != "EVENTFLOW_CONFIG"}
        clean.update(env)
        clean["EVENTFLOW_CONFIG"] = path
        r = subprocess.run([EVENTFLOW_BIN, "hash-token", "x"], env=clean,
                           capture_output=True, text=True)
        check(r.returncode == 0, section,
              f"eventflow loads the configuration (with {len(env)} environment overrides)",
              f"eventflow rejects the configuration: {r.stderr.strip()}")


def listen_port(cfg, svc):
    listen = cfg.get(svc, {}).get("listen", "")
    m = re.fullmatch(r"0\.0\.0\.0:(\d+)|\[::\]:(\d+)", listen)
    return int(m.group(1) or m.group(2)) if m else None


def promtool_check(section, config_path, rules_override=None):
    if not PROMTOOL:
        fail(section, "promtool not found (scripts/lib.sh installs the prometheus package)")
        return
    with tempfile.TemporaryDirectory() as d:
        path = config_path
        if rules_override is not None:
            with open(config_path) as f:
                doc = yaml.safe_load(f)
            doc["rule_files"] = rules_override
            path = os.path.join(d, "prometheus.yml")
            with open(path, "w") as f:
                yaml.safe_dump(doc, f)
        r = subprocess.run([PROMTOOL, "check", "config", path], capture_output=True, text=True)
        check(r.returncode == 0, section, f"promtool check config {config_path}",
              f"promtool check config {config_path}: {(r.stdout + r.stderr).strip()}")


# ---------------------------------------------------------------------------------------------
# a) docker compose
# ---------------------------------------------------------------------------------------------
print("compose (deploy/compose/docker-compose.yml)")
S = "compose"
COMPOSE_DIR = "deploy/compose"
COMPOSE_FILE = f"{COMPOSE_DIR}/docker-compose.yml"
VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, path):
    """Compose variable interpolation with every variable unset: ${VAR:-default} -> default."""
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m):
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if op in (":-", "-"):
            return default
        fail(S, f"{path}: ${{{name}}} has no default; the stack must start without a .env file")
        return ""
    parts = value.split("$$")
    return "$".join(VAR.sub(sub, p) for p in parts)


with open(COMPOSE_FILE) as f:
    raw = yaml.safe_load(f)
compose = interpolate(raw, "")
with open(COMPOSE_SCHEMA) as f:
    schema = json.load(f)
# The schema declares draft 2019-09 (as "http://json-schema.org/draft/2019-09/schema#").
errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(compose), key=lambda e: [str(p) for p in e.path])
for e in errors:
    fail(S, f"schema: {'/'.join(str(p) for p in e.path) or '(root)'}: {e.message}")
if not errors:
    ok(S, f"valid against the compose-spec schema ({os.path.relpath(COMPOSE_SCHEMA, os.path.expanduser('~'))})")

services = compose.get("services", {})
top_volumes = set((compose.get("volumes") or {}).keys())
top_networks = set((compose.get("networks") or {}).keys())
expected = {"kafka", "clickhouse", "migrate", "collector", "processor", "api", "prometheus", "grafana"}
check(expected <= set(services), S, f"services {', '.join(sorted(expected))} present",
      f"missing services: {sorted(expected - set(services))}")

one_shot = {dep for svc in services.values()
            for dep, spec in (svc.get("depends_on") or {}).items()
            if isinstance(spec, dict) and spec.get("condition") == "service_completed_successfully"}
used_volumes = set()
for name, svc in services.items():
    where = f"{S}: service {name}"
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, spec in deps.items():
        if dep not in services:
            fail(S, f"service {name} depends on unknown service {dep}")
            continue
        cond = spec.get("condition")
        target_hc = services[dep].get("healthcheck") or {}
        if cond == "service_healthy" and (not target_hc.get("test") or target_hc.get("disable")):
            fail(S, f"service {name} waits for {dep} to be healthy, but {dep} has no health check")
        if cond == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
            fail(S, f"service {name} waits for {dep} to complete, but {dep} restarts ({services[dep].get('restart')})")
    hc = svc.get("healthcheck")
    if not hc:
        fail(S, f"service {name} has no healthcheck")
    elif hc.get("disable"):
        if name not in one_shot:
            fail(S, f"service {name} disables its healthcheck but is not a one-shot dependency")
    elif not hc.get("test"):
        fail(S, f"service {name}: healthcheck without test")
    for net in (svc.get("networks") or []):
        if net not in top_networks:
            fail(S, f"service {name} uses undeclared network {net}")
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            src, kind = vol.get("source", ""), vol.get("type")
        else:
            src = vol.split(":")[0]
            kind = "bind" if src.startswith((".", "/", "~")) else "volume"
        if kind == "bind":
            path = os.path.normpath(os.path.join(COMPOSE_DIR, src))
            if not os.path.exists(path):
                fail(S, f"service {name} mounts {src}, which does not exist ({path})")
        elif kind == "volume" and src:
            used_volumes.add(src)
            if src not in top_volumes:
                fail(S, f"service {name} uses undeclared volume {src}")
    build = svc.get("build")
    if build:
        ctx = build if isinstance(build, str) else build.get("context", ".")
        ctx = os.path.normpath(os.path.join(COMPOSE_DIR, ctx))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        if not os.path.isfile(os.path.join(ctx, dockerfile)):
            fail(S, f"service {name}: build file {dockerfile} not found in context {ctx}")
for v in sorted(top_volumes - used_volumes):
    fail(S, f"volume {v} is declared but not used")
if not [p for p in problems if p.startswith(S)]:
    ok(S, "depends_on targets and conditions, health checks, networks, volumes, mounted files and build context")

# The stack's EventFlow configuration against the services.
ef_env = services["collector"].get("environment") or {}
cfg_mounts = [v for v in services["collector"].get("volumes", []) if isinstance(v, str) and v.endswith(":ro") and "eventflow.toml" in v]
cfg_path = ef_env.get("EVENTFLOW_CONFIG")
if check(cfg_mounts and cfg_mounts[0].split(":")[1] == cfg_path, S,
         f"EVENTFLOW_CONFIG ({cfg_path}) is the mounted eventflow.toml",
         f"EVENTFLOW_CONFIG {cfg_path} is not where eventflow.toml is mounted"):
    toml_path = os.path.normpath(os.path.join(COMPOSE_DIR, cfg_mounts[0].split(":")[0]))
    with open(toml_path) as f:
        toml_text = f.read()
    cfg = tomllib.loads(toml_text)
    for svc, port in (("collector", 8080), ("processor", 8082), ("api", 8081)):
        p = listen_port(cfg, svc)
        hc = " ".join(services[svc].get("healthcheck", {}).get("test", []))
        ports = [str(x) for x in services[svc].get("ports", []) + services[svc].get("expose", [])]
        check(p == port and f":{port}/" in hc and any(x == str(port) or x.endswith(f":{port}") for x in ports), S,
              f"{svc} listens on 0.0.0.0:{port}, matching its healthcheck and ports/expose",
              f"{svc}: {svc}.listen={cfg.get(svc, {}).get('listen')!r}, healthcheck {hc!r}, ports/expose {ports}")
    if services["processor"].get("ports"):
        fail(S, "the processor publishes a host port, so it cannot be scaled (--scale processor=N)")
    spool = cfg.get("collector", {}).get("spool_dir")
    check(any(isinstance(v, str) and v.startswith("collector-spool:") and v.split(":")[1] == spool
              for v in services["collector"].get("volumes", [])), S,
          f"collector.spool_dir {spool} is the named volume collector-spool",
          f"collector.spool_dir {spool} is not on the named volume collector-spool")
    check(cfg.get("kafka", {}).get("brokers") == "kafka:9092"
          and cfg.get("clickhouse", {}).get("url") == "http://clickhouse:8123", S,
          "kafka.brokers and clickhouse.url name the compose services",
          f"kafka.brokers / clickhouse.url do not name the compose services: {cfg.get('kafka')}, {cfg.get('clickhouse')}")
    env = {k: str(v) for k, v in ef_env.items() if k.startswith("EVENTFLOW__")}
    eventflow_config_check(S, toml_text, env)

# Prometheus of the stack: scrape targets, rules, promtool.
prom_cfg = f"{COMPOSE_DIR}/prometheus.yml"
with open(prom_cfg) as f:
    prom = yaml.safe_load(f)
targets = {t for sc in prom.get("scrape_configs", []) for st in sc.get("static_configs", []) for t in st.get("targets", [])}
targets |= {f"{n}:{dc.get('port')}" for sc in prom.get("scrape_configs", []) for dc in sc.get("dns_sd_configs", []) for n in dc.get("names", [])}
check({"collector:8080", "processor:8082", "api:8081"} <= targets, S,
      "prometheus.yml scrapes collector:8080, processor:8082, api:8081",
      f"prometheus.yml scrape targets {sorted(targets)} miss an EventFlow service")
prom_mounts = dict(v.split(":")[1::-1][:2] for v in services["prometheus"].get("volumes", []) if isinstance(v, str) and v.startswith("."))
rules_in_container = prom.get("rule_files", [])
local_rules = []
for r in rules_in_container:
    src = prom_mounts.get(r)
    if not src:
        fail(S, f"prometheus.yml loads {r}, which is not mounted into the prometheus service")
    else:
        local_rules.append(os.path.normpath(os.path.join(COMPOSE_DIR, src)))
if rules_in_container and len(local_rules) == len(rules_in_container):
    ok(S, f"alert rules mounted and loaded: {', '.join(local_rules)}")
if all(os.path.exists(p) for p in local_rules):
    promtool_check(S, prom_cfg, [os.path.abspath(p) for p in local_rules])

# Grafana: provisioned datasource and dashboard.
ds_file = f"{COMPOSE_DIR}/grafana/provisioning/datasources/prometheus.yml"
with open(ds_file) as f:
    ds = yaml.safe_load(f)
ds_uids = {d.get("uid") for d in ds.get("datasources", [])}
check(any(d.get("type") == "prometheus" and d.get("url") == "http://prometheus:9090" for d in ds.get("datasources", [])),
      S, "Grafana datasource provisioned for http://prometheus:9090", "no Grafana datasource for http://prometheus:9090")
dash_file = "deploy/grafana/eventflow.json"
gmounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"].get("volumes", []) if isinstance(v, str) and v.startswith(".")}
with open(f"{COMPOSE_DIR}/grafana/provisioning/dashboards/eventflow.yml") as f:
    provider = yaml.safe_load(f)
dash_dir = provider["providers"][0]["options"]["path"]
check(any(t.startswith(dash_dir + "/") and os.path.normpath(os.path.join(COMPOSE_DIR, s)) == dash_file for t, s in gmounts.items()),
      S, f"{dash_file} is mounted into the provisioned dashboard folder {dash_dir}",
      f"{dash_file} is not mounted into {dash_dir}")
if os.path.exists(dash_file):
    try:
        with open(dash_file) as f:
            dash = json.load(f)
        tvars = {v.get("name") for v in dash.get("templating", {}).get("list", []) if v.get("type") == "datasource"}
        bad = set()

        def walk(o):
            if isinstance(o, dict):
                d = o.get("datasource")
                if isinstance(d, dict) and isinstance(d.get("uid"), str):
                    uid = d["uid"]
                    m = re.fullmatch(r"\$\{?([A-Za-z0-9_]+)\}?", uid)
                    if m:
                        if m.group(1) not in tvars:
                            bad.add(uid)
                    elif uid not in ds_uids and d.get("type") not in ("grafana", "datasource", "__expr__"):
                        bad.add(uid)
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(dash)
        check(not bad, S, "dashboard datasources resolve to the provisioned datasource or a datasource variable",
              f"dashboard refers to datasource uids {sorted(bad)}: provisioned are {sorted(ds_uids)}")
    except json.JSONDecodeError as e:
        fail(S, f"{dash_file} is not JSON: {e}")

# ---------------------------------------------------------------------------------------------
# b) Kubernetes
# ---------------------------------------------------------------------------------------------
print("kubernetes (deploy/k8s/*.yaml)")
S = "k8s"
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

K8S_DIR = "deploy/k8s"
docs = []
for fn in sorted(os.listdir(K8S_DIR)):
    if fn.endswith((".yaml", ".yml")):
        with open(os.path.join(K8S_DIR, fn)) as f:
            for d in yaml.safe_load_all(f):
                if d:
                    docs.append((fn, d))
versions = ["1.30.0", latest_version()]
for version in versions:
    bad = 0
    for fn, d in docs:
        what = f"{fn} {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            bad += 1
            fail(S, f"{what} (Kubernetes {version}): {'.'.join(str(p) for p in e.path)}: {e.message}")
        except SchemaNotFoundError as e:
            bad += 1
            fail(S, f"{what}: {e.message}")
    if not bad:
        ok(S, f"{len(docs)} resources valid (kubernetes-validate --strict, Kubernetes {version})")

by_kind = {}
for fn, d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
namespaces = set(by_kind.get("Namespace", {}))
for fn, d in docs:
    ns = d["metadata"].get("namespace")
    if d["kind"] != "Namespace" and ns not in namespaces:
        fail(S, f"{fn} {d['kind']}/{d['metadata']['name']} is in namespace {ns!r}, not created here")

cm = by_kind.get("ConfigMap", {}).get("eventflow-config")
k8s_cfg, k8s_toml = {}, ""
if check(cm is not None and "eventflow.toml" in cm.get("data", {}), S,
         "ConfigMap eventflow-config holds eventflow.toml", "ConfigMap eventflow-config with eventflow.toml missing"):
    k8s_toml = cm["data"]["eventflow.toml"]
    k8s_cfg = tomllib.loads(k8s_toml)
partitions = k8s_cfg.get("kafka", {}).get("partitions", 6)
secret_keys = {k for s in by_kind.get("Secret", {}).values() for k in (s.get("stringData") or {})}

workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {}), **by_kind.get("Job", {})}
component_port = {"collector": 8080, "processor": 8082, "api": 8081}
env_for_config = {}
for name, w in workloads.items():
    kind = w["kind"]
    pod = w["spec"]["template"]["spec"]
    labels = w["spec"]["template"]["metadata"].get("labels", {})
    if kind != "Job":
        sel = w["spec"]["selector"]["matchLabels"]
        if not all(labels.get(k) == v for k, v in sel.items()):
            fail(S, f"{kind}/{name}: selector {sel} does not match the pod labels {labels}")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claim_templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
    for c in pod["containers"]:
        where = f"{kind}/{name} container {c['name']}"
        req = (c.get("resources") or {}).get("requests") or {}
        if not ("cpu" in req and "memory" in req):
            fail(S, f"{where}: resources.requests needs cpu and memory (has {req})")
        if kind != "Job":
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    fail(S, f"{where}: no {probe}")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if port is not None and port not in ports and port not in ports.values():
                    fail(S, f"{where}: {probe} uses port {port}, not a container port")
            comp = labels.get("app.kubernetes.io/component")
            if comp in component_port:
                want = component_port[comp]
                if listen_port(k8s_cfg, comp) != want or want not in ports.values():
                    fail(S, f"{where}: {comp}.listen {k8s_cfg.get(comp, {}).get('listen')!r} and containerPort {sorted(ports.values())} must both be 0.0.0.0:{want}")
                ann = w["spec"]["template"]["metadata"].get("annotations", {})
                if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(want):
                    fail(S, f"{where}: prometheus.io/scrape and prometheus.io/port={want} annotations missing")
        for vm in c.get("volumeMounts", []):
            if vm["name"] not in volumes and vm["name"] not in claim_templates:
                fail(S, f"{where}: volumeMount {vm['name']} has no volume")
        for ef in c.get("envFrom", []):
            ref = (ef.get("secretRef") or {}).get("name")
            if ref and ref not in by_kind.get("Secret", {}):
                fail(S, f"{where}: envFrom secret {ref} not defined (11-secret.example.yaml)")
        for e in c.get("env", []):
            if e["name"] == "EVENTFLOW_CONFIG":
                mounted = [vm for vm in c.get("volumeMounts", []) if e["value"].startswith(vm["mountPath"] + "/")]
                if not mounted or (volumes.get(mounted[0]["name"], {}).get("configMap") or {}).get("name") != "eventflow-config":
                    fail(S, f"{where}: EVENTFLOW_CONFIG {e['value']} is not the mounted ConfigMap eventflow-config")
            elif e["name"].startswith("EVENTFLOW__"):
                env_for_config[e["name"]] = e.get("value", "placeholder")
if not [p for p in problems if p.startswith(S)]:
    ok(S, "every workload has readiness and liveness probes on its ports, cpu/memory requests, matching selectors, config and secret references")

proc = by_kind.get("Deployment", {}).get("eventflow-processor")
if check(proc is not None, S, "processor is a Deployment", "Deployment eventflow-processor missing"):
    r = proc["spec"].get("replicas", 1)
    check(r <= partitions, S, f"processor replicas {r} <= kafka.partitions {partitions}",
          f"processor replicas {r} > kafka.partitions {partitions}: the extra pods would be idle")
    surge = proc["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    check(surge in (0, "0", "0%") or r < partitions, S, "processor rollouts never exceed the partition count",
          f"processor maxSurge {surge} with replicas == partitions runs more pods than partitions during rollouts")
    g = proc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    check(g >= 30, S, f"processor terminationGracePeriodSeconds {g} (flush on SIGTERM)",
          f"processor terminationGracePeriodSeconds {g} < 30")
    check(not any(h["spec"]["scaleTargetRef"]["name"] == "eventflow-processor" for h in by_kind.get("HorizontalPodAutoscaler", {}).values()),
          S, "no HPA on the processor (its bound is the partition count)", "an HPA scales the processor past the partition bound")

coll = by_kind.get("StatefulSet", {}).get("eventflow-collector")
if check(coll is not None, S, "collector is a StatefulSet", "StatefulSet eventflow-collector missing"):
    spool = k8s_cfg.get("collector", {}).get("spool_dir")
    tmpl = {t["metadata"]["name"]: t for t in coll["spec"].get("volumeClaimTemplates", [])}
    mounts = {vm["mountPath"]: vm["name"] for c in coll["spec"]["template"]["spec"]["containers"] for vm in c.get("volumeMounts", [])}
    check(mounts.get(spool) in tmpl, S, f"collector.spool_dir {spool} is a per-pod volumeClaimTemplate",
          f"collector.spool_dir {spool} is not on a volumeClaimTemplate (mounts {mounts})")
    check(coll["spec"].get("serviceName") in by_kind.get("Service", {}), S, "collector StatefulSet has its governing Service",
          f"serviceName {coll['spec'].get('serviceName')} not defined")
    if spool and mounts.get(spool) in tmpl:
        size = tmpl[mounts[spool]]["spec"]["resources"]["requests"]["storage"]
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
        m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", size)
        maxb = k8s_cfg.get("collector", {}).get("spool_max_bytes", 1 << 30)
        seg = k8s_cfg.get("collector", {}).get("spool_segment_bytes", 64 << 20)
        check(m and int(m.group(1)) * units[m.group(2)] >= maxb + 2 * seg, S,
              f"spool volume {size} >= spool_max_bytes + 2 segments",
              f"spool volume {size} is smaller than spool_max_bytes {maxb} + 2 x spool_segment_bytes")

for kind in ("HorizontalPodAutoscaler",):
    for name, h in by_kind.get(kind, {}).items():
        ref = h["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            fail(S, f"HPA {name} targets missing {ref['kind']}/{ref['name']}")
pod_label_sets = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads.values()]
for kind in ("Service", "PodDisruptionBudget"):
    for name, o in by_kind.get(kind, {}).items():
        sel = o["spec"]["selector"]
        sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
        if not any(all(l.get(k) == v for k, v in sel.items()) for l in pod_label_sets):
            fail(S, f"{kind} {name} selects no pods ({sel})")
for comp in ("collector", "processor", "api"):
    if not any(all(l.get(k) == v for k, v in o["spec"]["selector"]["matchLabels"].items())
               for o in by_kind.get("PodDisruptionBudget", {}).values()
               for l in [{"app.kubernetes.io/name": "eventflow", "app.kubernetes.io/component": comp}]):
        fail(S, f"no PodDisruptionBudget for the {comp}")
if k8s_toml:
    env = {k: "placeholder" for k in secret_keys}
    env.update(env_for_config)
    eventflow_config_check(S, k8s_toml, env)

# ---------------------------------------------------------------------------------------------
# c) ClickHouse cluster schema on chdb
# ---------------------------------------------------------------------------------------------
print("clickhouse cluster schema (sql/cluster/*.sql on chdb)")
S = "sql/cluster"
import chdb

CLUSTER, DATABASE = "ef_test", "ef_cluster"
SHARDING = {
    "facts": "kafka_partition", "minute_visits": "kafka_partition", "minute_live": "kafka_partition",
    "daily_totals": "kafka_partition", "daily_marketing": "kafka_partition",
    "late_facts": "kafka_partition", "backfill_marks": "kafka_partition",
    "processor_progress": "kafka_partition",
    "day_sessions": "kafka_partition",
    "session_first_visits": "cityHash64(client_id, session_id)",
    "fact_copies": "cityHash64(client_id, uid)",
    "dedup_notices": "writer_partition",
    "copy_log": "writer_partition",
    "rebuild_requests": "kafka_partition",
    "fact_days": "kafka_partition",
    "campaign_links": "cityHash64(cid)",
    "reconcile_findings": "cityHash64(client_id)",
    "link_clicks": "cityHash64(client_id, cid)",
}
# facts is ordered by fact_id, not kafka_partition: a fact always travels through one Kafka
# partition (topics are keyed by session), so kafka_partition is a function of the fact.
SHARDING_NOT_FROM_ORDER_BY = {"facts"}


def statements(sql):
    """The statement splitter of pipeline/store/src/migrate.rs."""
    out, cur = [], []
    for line in sql.splitlines():
        t = line.strip()
        if t.startswith("--") or not t:
            continue
        cur.append(line)
        if t.endswith(";"):
            stmt = "\n".join(cur).strip().rstrip(";").strip()
            if stmt:
                out.append(stmt)
            cur = []
    rest = "\n".join(cur).strip()
    if rest:
        out.append(rest)
    return out


tmp = tempfile.mkdtemp(prefix="ef-chdb-")
with open(os.path.join(tmp, "config.xml"), "w") as f:
    f.write(f"""<clickhouse>
  <tcp_port>9000</tcp_port>
  <remote_servers>
    <{CLUSTER}>
      <shard><internal_replication>true</internal_replication>
        <replica><host>localhost</host><port>9000</port></replica></shard>
    </{CLUSTER}>
  </remote_servers>
  <macros><shard>01</shard><replica>r1</replica></macros>
</clickhouse>
""")
conn = chdb.connect(f"file::memory:?config-file={tmp}/config.xml")
cur = conn.cursor()


def q(sql):
    cur.execute(sql)
    return cur.fetchall()


def lit(s):
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


version = q("SELECT version()")[0][0]
is_local = [tuple(r) for r in q(f"SELECT is_local FROM system.clusters WHERE cluster = '{CLUSTER}'")]


def formatted(stmt, where):
    try:
        return q(f"SELECT formatQuery({lit(stmt)})")[0][0]
    except Exception as e:
        fail(S, f"{where}: does not parse on ClickHouse {version}: {str(e).splitlines()[0][:300]}")
        return None


CREATE = re.compile(r"CREATE TABLE IF NOT EXISTS (?:(\w+)\.)?(\w+)(?: ON CLUSTER '?([^'\s]+)'?)?\s*(.*)", re.S)
ALTER_ADD = re.compile(r"ALTER TABLE (?:(\w+)\.)?(\w+)(?: ON CLUSTER '?[^'\s]+'?)?\s+\(?ADD COLUMN `?(\w+)`?\s+(.+?)\)?$", re.S)
DROP = re.compile(r"DROP TABLE IF EXISTS (?:(\w+)\.)?(\w+)")


def evolve(tables, fmt):
    """Applies a formatted ALTER ... ADD COLUMN or DROP TABLE to `tables` (name -> describe())."""
    m = ALTER_ADD.match(fmt)
    if m and m.group(2) in tables:
        tables[m.group(2)]["cols"].append((m.group(3), m.group(4).strip()))
        return True
    m = DROP.match(fmt)
    if m:
        tables.pop(m.group(2), None)
        return True
    return fmt.startswith("INSERT INTO")


def describe(fmt):
    """Columns, engine, engine args and ORDER BY of a formatted CREATE TABLE."""
    m = CREATE.match(fmt)
    if not m:
        return None
    db, table, cluster, rest = m.groups()
    cols = []
    body = re.match(r"\((.*?)\n\)\n(.*)", rest, re.S)
    if body:
        for line in body.group(1).strip().splitlines():
            cm_ = re.match(r"\s*`?(\w+)`?\s+(.+?),?$", line)
            cols.append((cm_.group(1), cm_.group(2)))
        rest = body.group(2)
    asm = re.match(r"AS (?:(\w+)\.)?(\w+)\n(.*)", rest, re.S)
    as_table = None
    if asm:
        as_table = (asm.group(1), asm.group(2))
        rest = asm.group(3)
    em = re.match(r"ENGINE = (\w+)(?:\((.*?)\))?(?:\nORDER BY (.+?))?(?:\n|$)", rest, re.S)
    engine, args, order = em.groups() if em else (None, None, None)
    args = [a.strip() for a in re.findall(r"'[^']*'|[^,]+\([^)]*\)|[^,]+", args or "")]
    order = order.strip() if order else None
    if order and order.startswith("(") and order.endswith(")"):
        order = order[1:-1]
    return {"db": db, "table": table, "cluster": cluster, "cols": cols, "as": as_table,
            "engine": engine, "args": args, "order": [o.strip() for o in order.split(",")] if order else []}


single = {}
for fn in sorted(f for f in os.listdir("sql") if re.fullmatch(r"\d+_.*\.sql", f)):
    with open(os.path.join("sql", fn)) as f:
        for stmt in statements(f.read()):
            fmt = formatted(stmt, f"sql/{fn}")
            d = describe(fmt) if fmt else None
            if d:
                single[d["table"]] = d
            elif fmt and not evolve(single, fmt):
                fail(S, f"sql/{fn}: statement neither CREATE TABLE, ALTER ... ADD COLUMN, INSERT nor DROP TABLE: {fmt.splitlines()[0]}")
check(set(single) == set(SHARDING), S, f"{len(single)} single-node tables, each with a sharding key",
      f"single-node tables {sorted(set(single) ^ set(SHARDING))} have no sharding key here (or vanished)")

cluster_files = sorted(f for f in os.listdir("sql/cluster") if f.endswith(".sql"))
singles_files = sorted(f for f in os.listdir("sql") if re.fullmatch(r"\d+_.*\.sql", f))
check(cluster_files == singles_files, S, f"files mirror sql/: {', '.join(cluster_files)}",
      f"sql/cluster files {cluster_files} do not mirror sql/ {singles_files}")
cluster_stmts = []
n_parsed = 0
for fn in cluster_files:
    with open(os.path.join("sql/cluster", fn)) as f:
        text = f.read()
    head = text.lstrip().splitlines()[0] if text.strip() else ""
    if not head.startswith("--"):
        fail(S, f"{fn}: starts without the comment explaining the sharding keys")
    stray = set(re.findall(r"\{(\w+)\}", text)) - {"cluster", "database", "shard", "replica"}
    if stray:
        fail(S, f"{fn}: unknown placeholders {sorted(stray)} (only {{cluster}} {{database}} {{shard}} {{replica}})")
    for stmt in statements(text):
        # INSERT ... SELECT goes through Distributed tables; ALTER ... ADD COLUMN has no IF NOT
        # EXISTS on 18.16 (the migration runner skips it when the column exists).
        insert = stmt.startswith("INSERT INTO")
        if "ON CLUSTER '{cluster}'" not in stmt and not insert:
            fail(S, f"{fn}: statement without ON CLUSTER '{{cluster}}': {stmt.splitlines()[0]}")
        if "IF NOT EXISTS" not in stmt and "IF EXISTS" not in stmt and not insert and " ADD COLUMN " not in stmt:
            fail(S, f"{fn}: statement is not idempotent (IF NOT EXISTS): {stmt.splitlines()[0]}")
        sub = stmt.replace("{cluster}", CLUSTER).replace("{database}", DATABASE)
        fmt = formatted(sub, f"sql/cluster/{fn}")
        if fmt is None:
            continue
        n_parsed += 1
        cluster_stmts.append((fn, sub, fmt))
if n_parsed:
    ok(S, f"{n_parsed} statements parse on ClickHouse {version} (formatQuery)")

local, dist = {}, {}
for fn, sub, fmt in cluster_stmts:
    d = describe(fmt)
    if d is None:
        evolve(local, fmt)
        evolve(dist, fmt)
        continue
    if d["db"] != DATABASE:
        fail(S, f"{fn}: table {d['table']} is not qualified with {{database}}")
    (local if d["table"].endswith("_local") else dist)[d["table"]] = d
for t, s in single.items():
    l, di = local.get(f"{t}_local"), dist.get(t)
    if l is None or di is None:
        fail(S, f"{t}: needs {t}_local and the Distributed {t}")
        continue
    if l["cols"] != s["cols"]:
        fail(S, f"{t}_local columns differ from sql/ {t}: {sorted(set(l['cols']) ^ set(s['cols']))}")
    if l["order"] != s["order"]:
        fail(S, f"{t}_local ORDER BY {l['order']} != {s['order']}")
    if l["engine"] != "Replicated" + s["engine"]:
        fail(S, f"{t}_local engine {l['engine']} is not Replicated{s['engine']}")
    want_args = [f"'/clickhouse/tables/{{shard}}/{DATABASE}/{t}_local'", "'{replica}'"] + s["args"]
    if l["args"] != want_args:
        fail(S, f"{t}_local engine arguments {l['args']} != {want_args} (path, replica, version column of sql/ {t})")
    want = ["'" + CLUSTER + "'", "'" + DATABASE + "'", f"'{t}_local'", SHARDING[t]]
    if di["engine"] != "Distributed" or di["args"] != want:
        fail(S, f"{t}: Distributed({', '.join(di['args'])}) != Distributed({', '.join(want)})")
    if di["as"] != (DATABASE, f"{t}_local") and di["cols"] != s["cols"]:
        fail(S, f"{t}: the Distributed table must be AS {{database}}.{t}_local (or repeat its columns)")
    key_cols = set(re.findall(r"\w+", SHARDING[t])) - {"cityHash64"}
    if t not in SHARDING_NOT_FROM_ORDER_BY and not key_cols <= set(s["order"]):
        fail(S, f"{t}: sharding key {SHARDING[t]} is not made of ORDER BY columns {s['order']}: versions of a row could be split across shards")
extra = (set(local) | set(dist)) - {f"{t}_local" for t in single} - set(single)
if extra:
    fail(S, f"tables without a single-node counterpart: {sorted(extra)}")
if not [p for p in problems if p.startswith(S)]:
    ok(S, f"{len(local)} T_local tables match sql/ (columns, ORDER BY, version column); "
          f"{len(dist)} Distributed tables with the expected sharding keys")

# Execute: ON CLUSTER removed, Replicated engines replaced by their non-replicated form (no
# Keeper here), Distributed over a one-shard cluster that is this process. Then insert two
# versions of a row key (and a second key) through every Distributed table and through the
# single-node table, and compare the FINAL results.
if is_local != [(1,)]:
    fail(S, f"chdb did not load the local test cluster {CLUSTER} (system.clusters: {is_local})")
else:
    try:
        q("CREATE DATABASE single")
        q("USE single")
        for fn in singles_files:
            with open(os.path.join("sql", fn)) as f:
                for stmt in statements(f.read()):
                    q(stmt)
        q("USE default")
        for fn, sub, fmt in cluster_stmts:
            local_sql = sub.replace(f" ON CLUSTER '{CLUSTER}'", "")
            local_sql = re.sub(r"Replicated(\w+MergeTree)\('[^']*', '[^']*'(?:, )?", r"\1(", local_sql)
            q(local_sql)
        ok(S, f"cluster DDL executed on chdb {version} (one local shard; engines non-replicated)")
        executed = True
    except Exception as e:
        fail(S, f"executing the cluster DDL: {str(e).splitlines()[0][:300]}")
        executed = False
    if executed:
        sample = {"String": "'k'", "Date": "'2026-11-26'", "DateTime": "'2026-11-26 10:00:00'"}
        mism = 0
        for t, s in single.items():
            ver = s["args"][0] if s["args"] else None
            def row(key, v):
                vals = []
                for name, typ in s["cols"]:
                    if name == ver:
                        vals.append(str(v))
                    elif typ in sample:
                        vals.append(sample[typ] if name not in ("client_id", "cid") else f"'{key}'")
                    elif typ.startswith("Enum"):
                        vals.append(re.search(r"'([^']*)'", typ).group(0))
                    elif name == "kafka_partition" or name in s["order"]:
                        # Key columns are a function of the key (tables without a version
                        # column fold rows of one key that are equal in every column).
                        vals.append(str(len(key)))
                    else:
                        vals.append(str(v))
                return "(" + ", ".join(vals) + ")"
            try:
                # One INSERT per row (one part each, like separate flushes): a single block
                # would already be collapsed on insert (optimize_on_insert).
                for r in (row("a", 1), row("a", 2), row("bb", 1)):
                    for target in (f"single.{t}", f"{DATABASE}.{t}"):
                        q(f"INSERT INTO {target} SETTINGS insert_distributed_sync = 1 VALUES {r}")
                cols = ", ".join(n for n, _ in s["cols"])
                a = [tuple(x) for x in q(f"SELECT {cols} FROM single.{t} FINAL ORDER BY {cols}")]
                b = [tuple(x) for x in q(f"SELECT {cols} FROM {DATABASE}.{t} FINAL ORDER BY {cols}")]
                l = q(f"SELECT count() FROM {DATABASE}.{t}_local")[0][0]
                if a != b or len(b) != 2 or l < 2:
                    mism += 1
                    fail(S, f"{t}: FINAL through the Distributed table gave {len(b)} rows ({l} stored), single-node {len(a)}")
            except Exception as e:
                mism += 1
                fail(S, f"{t}: insert/select through the Distributed table: {str(e).splitlines()[0][:300]}")
        if not mism:
            ok(S, f"INSERT (insert_distributed_sync = 1) through {len(single)} Distributed tables and SELECT ... FINAL equal the single-node tables")
conn.close()
shutil.rmtree(tmp, ignore_errors=True)

# The example server configuration of sql/cluster/README.md: loaded by ClickHouse (chdb, in a
# separate process: one configuration per process) it must define 2 shards x 2 replicas with
# internal replication and the shard/replica macros; the user profile must make Distributed
# inserts synchronous and quorum writes cover the replicas.
with open("sql/cluster/README.md") as f:
    readme = f.read()
xml_blocks = re.findall(r"```xml\n(.*?)```", readme, re.S)
server_xml = next((b for b in xml_blocks if "<remote_servers>" in b), None)
users_xml = next((b for b in xml_blocks if "<profiles>" in b), None)
if not (server_xml and users_xml):
    fail(S, "README.md lacks the example config.d (remote_servers) or users.d (profiles) XML")
else:
    import xml.etree.ElementTree as ET
    try:
        srv, usr = ET.fromstring(server_xml), ET.fromstring(users_xml)
        shards = srv.findall("./remote_servers/*/shard")
        check(len(shards) == 2 and all(len(sh.findall("replica")) == 2 and sh.findtext("internal_replication") == "true" for sh in shards)
              and srv.find("./macros/shard") is not None and srv.find("./macros/replica") is not None
              and srv.find("./zookeeper/node") is not None,
              S, "README example: 2 shards x 2 replicas, internal_replication, macros, Keeper",
              "README example config is not 2 shards x 2 replicas with internal_replication, macros and Keeper")
        prof = usr.find("./profiles/eventflow")
        quorum = prof.findtext("insert_quorum") if prof is not None else None
        check(prof is not None and prof.findtext("insert_distributed_sync") == "1" and quorum and int(quorum) == 2,
              S, "README example profile: insert_distributed_sync = 1, insert_quorum = replicas per shard",
              "README example profile must set insert_distributed_sync = 1 and insert_quorum = 2")
    except ET.ParseError as e:
        fail(S, f"README example XML does not parse: {e}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.xml")
        with open(path, "w") as f:
            f.write(server_xml)
        code = ("import chdb, sys\n"
                "c = chdb.connect('file::memory:?config-file=' + sys.argv[1]); cur = c.cursor()\n"
                "cur.execute(\"SELECT shard_num, replica_num FROM system.clusters WHERE cluster = 'eventflow' ORDER BY 1, 2\")\n"
                "print([tuple(r) for r in cur.fetchall()]); c.close()\n")
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300)
        check(r.returncode == 0 and r.stdout.strip() == "[(1, 1), (1, 2), (2, 1), (2, 2)]", S,
              f"README example config loaded by ClickHouse {version}: cluster eventflow = 2 shards x 2 replicas",
              f"ClickHouse does not load the README example config as 2 x 2: {r.stdout.strip()} {r.stderr.strip()[-300:]}")

# ---------------------------------------------------------------------------------------------
# d) Dockerfile, Prometheus configuration of deploy/prometheus
# ---------------------------------------------------------------------------------------------
print("dockerfile (deploy/Dockerfile)")
S = "dockerfile"
from dockerfile_parse import DockerfileParser

dfp = DockerfileParser(path="deploy/Dockerfile")
instr = dfp.structure
froms = [i["value"] for i in instr if i["instruction"] == "FROM"]
check(len(froms) == 2 and froms[0].startswith("rust:1-bookworm") and froms[-1] == "debian:bookworm-slim", S,
      f"multi-stage: {' -> '.join(froms)}", f"unexpected stages {froms}")
runs = " ".join(i["value"] for i in instr if i["instruction"] == "RUN")
check("cargo build --release --locked --bin eventflow" in runs, S, "cargo build --release --locked --bin eventflow",
      "no `cargo build --release --locked --bin eventflow`")
last_from = max(n for n, i in enumerate(instr) if i["instruction"] == "FROM")
final = instr[last_from:]
users = [i["value"].split(":")[0] for i in final if i["instruction"] == "USER"]
check(users and users[-1] not in ("0", "root"), S, f"runtime runs as user {users[-1] if users else '?'}", "runtime stage runs as root")
check(any(i["instruction"] == "ENTRYPOINT" and json.loads(i["value"]) == ["eventflow"] for i in final), S,
      'ENTRYPOINT ["eventflow"]', 'runtime stage lacks ENTRYPOINT ["eventflow"]')
check("ca-certificates" in " ".join(i["value"] for i in final if i["instruction"] == "RUN"), S,
      "runtime has ca-certificates", "runtime lacks ca-certificates")
for i in instr:
    if i["instruction"] in ("COPY", "ADD") and "--from" not in i["value"]:
        srcs = i["value"].split()[:-1]
        for s_ in srcs:
            if not s_.startswith("--") and not os.path.exists(s_):
                fail(S, f"COPY source {s_} does not exist in the build context (repository root)")
expose = " ".join(i["value"] for i in final if i["instruction"] == "EXPOSE").split()
check({"8080", "8081", "8082"} <= set(expose), S, "exposes 8080 8081 8082", f"EXPOSE {expose}")

print("prometheus (deploy/prometheus/prometheus.yml)")
if os.path.exists("deploy/prometheus/prometheus.yml"):
    promtool_check("prometheus", "deploy/prometheus/prometheus.yml")
else:
    print("  skip prometheus: deploy/prometheus/prometheus.yml does not exist")

print()
if problems:
    print(f"validate_deploy: {len(problems)} problem(s), {checks} checks passed")
    sys.exit(1)
print(f"validate_deploy: all {checks} checks passed")
PY

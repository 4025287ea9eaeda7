#!/usr/bin/env bash
# The Kubernetes manifests (deploy/k8s, a kustomize base) checked offline, no
# cluster: a copy of the base gets a fresh TLS dir from `ringtrain certs init`
# (placeholder files when target/release/ringtrain is not built), renders with
# `kubectl kustomize`, validates strictly (unknown fields are errors) against
# the Kubernetes JSON schemas of K8S_VERSIONS (kubernetes-validate, in .venv),
# and the rendered objects are checked for what a user relies on: gRPC probes
# on the plaintext health port, resource requests, the PDB selecting the
# workers, a headless worker Service, the coordinator's volumeClaimTemplate
# mounted by the workers, the Secrets holding each role's files, the ports,
# addresses and RINGTRAIN_* keys agreeing with each other and with the code.
#
#   tests/deploy/k8s-render.sh      # K8S_VERSIONS ("1.30.0 1.37.0"); a few seconds
#
# Prints `SKIPPED: <reason>` where kubectl or kubernetes-validate cannot be
# had (a failure under CI).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TEST_NAME=k8s-render
source tests/shell/lib.sh
BIN=$ROOT/target/release/ringtrain
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
PY=$ROOT/.venv/bin/python

source scripts/env.sh
# kubectl as installed; else Debian's (it conflicts with other kubectl packages).
if ! command -v kubectl >/dev/null 2>&1; then
  ensure_debs kubernetes-client || skip "no kubectl, and Debian's kubernetes-client could not be installed"
fi
kubectl kustomize --help >/dev/null 2>&1 || skip "this kubectl has no 'kustomize' command"
if ! "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  ensure_venv || true
fi
"$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null || skip "kubernetes-validate is not in .venv and could not be installed"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-k8s.XXXXXX")
cleanup() {
  if [ "$failed" -gt 0 ] && [ -s "$tmp/kustomize.err" ]; then
    say "--- kubectl kustomize ---"
    tail -20 "$tmp/kustomize.err" >&2 || true
  fi
  rm -rf "$tmp"
}
# A copy: the real base reads deploy/k8s/tls/, which is the user's (git-ignored).
cp -r deploy/k8s "$tmp/k8s"
rm -rf "$tmp/k8s/tls"

# The TLS dir as the README says to make it.
HOSTS=(ringtrain-coordinator ringtrain-coordinator.ringtrain.svc ringtrain-coordinator.ringtrain.svc.cluster.local)
host_args=()
for h in "${HOSTS[@]}"; do host_args+=(--host "$h"); done
real_certs=0
if [ -x "$BIN" ]; then
  if "$BIN" certs init "$tmp/k8s/tls" "${host_args[@]}" >"$tmp/certs.log" 2>&1; then
    real_certs=1
    ok "ringtrain certs init wrote $(cd "$tmp/k8s/tls" && echo *)"
  else
    must "ringtrain certs init: $(tail -1 "$tmp/certs.log")"
  fi
else
  say "note: $BIN is not built: placeholder files stand in for the certificates"
  mkdir -p "$tmp/k8s/tls"
  for f in ca.pem ca.key coordinator.pem coordinator.key worker.pem worker.key client.pem client.key token tokens.toml; do
    echo "PLACEHOLDER for the k8s-render test, not a certificate" >"$tmp/k8s/tls/$f"
  done
fi

# Renders without a cluster.
if kubectl kustomize "$tmp/k8s" >"$tmp/rendered.yaml" 2>"$tmp/kustomize.err"; then
  ok "kubectl kustomize deploy/k8s: $(grep -c '^kind:' "$tmp/rendered.yaml") objects ($(kubectl version --client 2>/dev/null | grep -m1 -i kustomize || echo 'kustomize'))"
else
  must "kubectl kustomize deploy/k8s: $(tail -1 "$tmp/kustomize.err")"
fi

# Validates against the schemas, unknown fields refused.
for v in $K8S_VERSIONS; do
  if "$ROOT/.venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$tmp/rendered.yaml" >"$tmp/validate.log" 2>&1; then
    ok "kubernetes-validate --strict -k $v: every object valid"
  else
    bad "kubernetes-validate --strict -k $v: $(grep -m3 -i 'error\|not' "$tmp/validate.log" | tr '\n' ' ')"
  fi
done

# The server certificate names the Service the workers dial (for tools that
# check host names: `ringtrain health`, grpcurl; ringtrain's own clients
# check the coordinator role).
if [ "$real_certs" = 1 ] && command -v openssl >/dev/null 2>&1; then
  san=$(openssl x509 -noout -ext subjectAltName -in "$tmp/k8s/tls/coordinator.pem" 2>/dev/null || true)
  missing=""
  for h in "${HOSTS[@]}" coordinator.ringtrain.internal; do
    grep -q "DNS:$h\(,\|\$\)" <<<"$san" || missing="$missing $h"
  done
  if [ -z "$missing" ]; then
    ok "coordinator.pem names the coordinator Service's DNS names"
  else
    bad "coordinator.pem lacks:$missing (has: $(tr -s ' \n' ' ' <<<"$san"))"
  fi
fi

# What a user checks on the rendered objects. One line per check:
# "ok: ..." or "FAIL: ...".
py_rc=0
"$PY" - "$tmp/rendered.yaml" "$ROOT" >"$tmp/checks.out" 2>&1 <<'EOF' || py_rc=$?
import re, sys
import yaml

rendered, root = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
def ok(m): print("ok:", m)
def bad(m): print("FAIL:", m)
def check(cond, m, why=""):
    ok(m) if cond else bad(m + (f" ({why})" if why else ""))

def find(kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]

def one(kind, name):
    found = find(kind, name)
    if len(found) != 1:
        bad(f"one {kind} {name} (found {len(found)})")
        sys.exit(0)
    return found[0]

kinds = sorted(f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs)
check(len(kinds) == 7, "7 objects: " + ", ".join(kinds))
check(all("namespace" not in d["metadata"] for d in docs),
      "no object names a namespace (kubectl apply -k ... -n NS, or an overlay's namespace, places them)")

sts = one("StatefulSet", "ringtrain-coordinator")
dep = one("Deployment", "ringtrain-worker")
csvc = one("Service", "ringtrain-coordinator")
wsvc = one("Service", "ringtrain-worker")
pdb = one("PodDisruptionBudget", "ringtrain-worker")
secrets = {s["metadata"]["name"]: s for s in find("Secret")}

def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}
def env_value(c, key):
    return env_of(c).get(key, {}).get("value")
def port_of(addr):
    return int(addr.rsplit(":", 1)[1])
def container_ports(c):
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}
def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

# The config keys each role reads (the fields of its config struct), for the
# RINGTRAIN_* variables the manifests set.
def config_keys(path):
    src = open(f"{root}/{path}").read()
    return set(re.findall(r"^\s*pub (\w+):", src, re.M))
keys = {
    "coordinator": config_keys("coordinator/src/config.rs"),
    "worker": config_keys("worker/src/config.rs"),
}
uid = int(re.search(r"--uid (\d+)", open(f"{root}/deploy/Dockerfile").read()).group(1))
role_files = {
    "coordinator": {"ca.pem", "coordinator.pem", "coordinator.key", "tokens.toml"},
    "worker": {"ca.pem", "worker.pem", "worker.key"},
}

for role, w in (("coordinator", sts), ("worker", dep)):
    pod = w["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    check(matches(w["spec"]["selector"]["matchLabels"], labels), f"{role}: its selector matches its pod labels")
    cs = spec["containers"]
    check(len(cs) == 1, f"{role}: one container")
    c = cs[0]
    ports = container_ports(c)
    check(c["image"].split("@")[0].split(":")[0].endswith("ringtrain") and c.get("args") == [role],
          f"{role}: image ringtrain, command '{role}'", f'{c["image"]} {c.get("args")}')

    # Probes: native gRPC, on the plaintext health listener.
    health = env_value(c, "RINGTRAIN_HEALTH_LISTEN")
    check(health is not None and ports.get("health") == port_of(health),
          f"{role}: RINGTRAIN_HEALTH_LISTEN ({health}) is its container port 'health' ({ports.get('health')})")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        p = c.get(probe)
        if probe != "startupProbe" or p is not None:
            check(p is not None and set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
                  and p["grpc"].get("port") == ports.get("health") and not p["grpc"].get("service"),
                  f"{role}: {probe} is grpc on the health port {ports.get('health')}", str(p))

    # Resources.
    r = c.get("resources", {})
    check({"cpu", "memory"} <= set(r.get("requests", {})) and "memory" in r.get("limits", {}),
          f"{role}: requests cpu and memory, limits memory: {r}")

    # Security: the image's non-root user, nothing more than it needs.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == uid and psc.get("fsGroup") == uid,
          f"{role}: runs as non-root uid {uid} (deploy/Dockerfile), fsGroup {uid}", str(psc))
    check(csc.get("allowPrivilegeEscalation") is False and csc.get("capabilities", {}).get("drop") == ["ALL"]
          and csc.get("readOnlyRootFilesystem") is True,
          f"{role}: no privilege escalation, no capabilities, read-only root", str(csc))
    check(spec.get("automountServiceAccountToken") is False, f"{role}: no service account token")

    # Metrics: the scrape annotations name the metrics port.
    ann = pod["metadata"].get("annotations", {})
    metrics = env_value(c, "RINGTRAIN_METRICS_LISTEN")
    check(ann.get("prometheus.io/scrape") == "true" and metrics is not None
          and int(ann.get("prometheus.io/port", 0)) == ports.get("metrics") == port_of(metrics)
          and ann.get("prometheus.io/path") == "/metrics",
          f"{role}: prometheus.io annotations scrape port {ann.get('prometheus.io/port')} = metrics_listen {metrics}")
    check(port_of(env_value(c, "RINGTRAIN_LISTEN")) == ports.get("grpc"),
          f"{role}: RINGTRAIN_LISTEN is its container port 'grpc' ({ports.get('grpc')})")

    # RINGTRAIN_* variables name keys the role reads (LOG_FORMAT is the CLI's own).
    for name in env_of(c):
        key = name.removeprefix("RINGTRAIN_").lower()
        if name == "RINGTRAIN_LOG_FORMAT":
            continue
        if key == "health_listen" and key not in keys[role]:
            print(f"note: {role}: {name} is not a {role} config key in this checkout yet (the health listener)")
            continue
        check(key in keys[role], f"{role}: {name} is a {role} config key")

    # Certificates: the Secret mounted at RINGTRAIN_TLS_DIR holds exactly the
    # role's files.
    tls_dir = env_value(c, "RINGTRAIN_TLS_DIR")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    m = mounts.get(tls_dir)
    sec = vols.get(m["name"], {}).get("secret") if m else None
    s = secrets.get(sec["secretName"]) if sec else None
    check(s is not None and m.get("readOnly") is True,
          f"{role}: a generated Secret ({sec and sec['secretName']}) is mounted read-only at RINGTRAIN_TLS_DIR {tls_dir}")
    if s is not None:
        check(set(s.get("data", {})) == role_files[role],
              f"{role}: its Secret holds {sorted(role_files[role])}", str(sorted(s.get("data", {}))))
        # fsGroup makes the files the process's group's: it must read them.
        check(sec.get("defaultMode", 0o644) & 0o040, f"{role}: the Secret's files are group-readable ({oct(sec.get('defaultMode', 0o644))})")

    # Services select this role's pods and name its container ports.
    svc = csvc if role == "coordinator" else wsvc
    check(matches(svc["spec"]["selector"], labels), f"Service {svc['metadata']['name']} selects the {role} pods")
    for p in svc["spec"]["ports"]:
        check(p["targetPort"] in ports, f"Service {svc['metadata']['name']} port {p['name']} targets container port {p['targetPort']}")

check(all("ca.key" not in s.get("data", {}) and "client.key" not in s.get("data", {}) for s in secrets.values()),
      "no Secret holds ca.key or client.key")
check(wsvc["spec"].get("clusterIP") == "None", "the worker Service is headless (clusterIP: None)")
check(csvc["spec"].get("clusterIP") != "None" and csvc["spec"].get("type", "ClusterIP") == "ClusterIP",
      "the coordinator Service is a ClusterIP Service")
check(sts["spec"]["serviceName"] == csvc["metadata"]["name"], "the StatefulSet's serviceName is the coordinator Service")
check(sts["spec"]["replicas"] == 1, "one coordinator (the job store has one writer)")
check(dep["spec"].get("replicas", 1) >= 2, f"{dep['spec'].get('replicas')} worker replicas")

# The PDB covers the workers, and only them.
sel = pdb["spec"]["selector"]["matchLabels"]
check(matches(sel, dep["spec"]["template"]["metadata"]["labels"]) and not matches(sel, sts["spec"]["template"]["metadata"]["labels"]),
      f"the PodDisruptionBudget selects the worker pods only ({sel})")
check(("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"]), f"the PodDisruptionBudget sets one bound: {pdb['spec']}")

# The coordinator's volume: a claim template at its data dir, mounted by the
# workers at the same path (rank 0 writes checkpoints there).
coord = sts["spec"]["template"]["spec"]["containers"][0]
worker = dep["spec"]["template"]["spec"]["containers"][0]
data_dir = env_value(coord, "RINGTRAIN_DATA_DIR")
vcts = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
cm = {m["mountPath"]: m["name"] for m in coord.get("volumeMounts", [])}
check(cm.get(data_dir) in vcts and "storage" in vcts[cm[data_dir]]["spec"]["resources"]["requests"],
      f"the StatefulSet has a volumeClaimTemplate ({cm.get(data_dir)}) mounted at RINGTRAIN_DATA_DIR {data_dir}")
claim = f"{cm.get(data_dir)}-{sts['metadata']['name']}-0"
wm = {m["mountPath"]: m["name"] for m in worker.get("volumeMounts", [])}
wv = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
check(wv.get(wm.get(data_dir), {}).get("persistentVolumeClaim", {}).get("claimName") == claim,
      f"the workers mount the coordinator's claim {claim} at {data_dir}")

# Rendezvous: workers dial the coordinator Service, advertise their pod IP.
grpc_port = next(p["port"] for p in csvc["spec"]["ports"] if p["name"] == "grpc")
url = env_value(worker, "RINGTRAIN_COORDINATOR")
check(url == f"https://{csvc['metadata']['name']}:{grpc_port}", f"workers dial the coordinator Service over TLS: {url}")
adv = env_of(worker).get("RINGTRAIN_ADVERTISE_HOST", {})
check(adv.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
      "workers advertise their pod IP (downward API status.podIP)")
check(port_of(env_value(worker, "RINGTRAIN_RING_LISTEN")) == container_ports(worker).get("ring"),
      "RINGTRAIN_RING_LISTEN is the worker's container port 'ring'")
EOF
while IFS= read -r line; do
  case "$line" in
    ok:*) ok "${line#ok: }" ;;
    FAIL:*) bad "${line#FAIL: }" ;;
    *) say "$line" ;;
  esac
done <"$tmp/checks.out"
[ "$py_rc" = 0 ] || bad "the checks of the rendered objects stopped (exit $py_rc)"
finish

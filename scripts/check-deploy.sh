#!/usr/bin/env bash
# Checks the deployment files: Dockerfile, Helm chart, rendered manifests.
#
#   scripts/install-tools.sh    # once
#   scripts/check-deploy.sh
#
# 1. hadolint on the Dockerfile
# 2. values.schema.json is a valid draft-07 schema; every value is documented in the
#    chart README
# 3. helm lint --strict with the default values and with each helm/ci-values-*.yaml
# 4. rendering with the pure defaults fails with a clear message (serialNumber is required),
#    and so does auth.mode enforce (the default) without callers
# 5. helm template for each profile (defaults + serialNumber + a callers file, helm/ci-values-all.yaml,
#    helm/ci-values-existing-secrets.yaml), then
#    - kubernetes-validate --strict against each version in KUBE_VERSIONS, where a resource
#      without a schema counts as a failure,
#    - the ServiceMonitor and PrometheusRule (CRDs kubernetes-validate does not know)
#      validated separately with the prometheus-operator models (scripts/validate-crds.mjs),
#    - the PrometheusRule's spec is the plain rules file (files/alerts.yaml) with the
#      chart's job put in, every runbook_url is prometheusRule.runbookBaseUrl (of the
#      profile) + "#" + the alert's section, and the dashboard ConfigMap carries
#      files/dashboard.json,
#    - the container gets every LICENSING_* setting the service reads (all-on; the license
#      file, which excludes the licensing server, in existing-secrets).
#
# Works offline once the tools are installed. Exits non-zero on any failure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${ROOT}/helm/comtrexx-licensing"
# Oldest supported version (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.34.0}"
# shellcheck source=tools-env.sh
source "${ROOT}/scripts/tools-env.sh"
PY="${ROOT}/.tools/venv/bin/python"

for tool in hadolint helm kubernetes-validate node; do
  command -v "${tool}" >/dev/null 2>&1 || {
    echo "error: ${tool} not found; run scripts/install-tools.sh first" >&2
    exit 2
  }
done

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT

failures=()
pass() { printf '  ok    %s\n' "$1"; }
fail() { printf '  FAIL  %s\n' "$1"; failures+=("$1"); }
section() { printf '\n== %s\n' "$1"; }

# run NAME CMD...: runs CMD, shows its output only when it fails.
run() {
  local name="$1"; shift
  if "$@" >"${WORK}/out" 2>&1; then
    pass "${name}"
  else
    sed 's/^/        /' "${WORK}/out"
    fail "${name}"
  fi
}

section "Dockerfile"
run "hadolint Dockerfile" hadolint --config "${ROOT}/.hadolint.yaml" "${ROOT}/Dockerfile"

section "chart metadata"
run "values.schema.json is a valid draft-07 schema" "${PY}" - "${CHART}/values.schema.json" <<'PY'
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
assert schema.get("$schema") == "http://json-schema.org/draft-07/schema#", "not a draft-07 schema"
jsonschema.Draft7Validator.check_schema(schema)
PY
run "every value is documented in the chart README" "${PY}" - "${CHART}/values.yaml" "${CHART}/README.md" <<'PY'
import sys, yaml
values = yaml.safe_load(open(sys.argv[1]))
readme = open(sys.argv[2]).read()
# Maps whose keys are free-form (labels, selectors, ...) count as leaves.
FREE = {"podAnnotations", "podLabels", "nodeSelector", "affinity", "resources",
        "podSecurityContext", "securityContext", "annotations", "labels", "behavior",
        "clientPodLabels", "clientNamespaceSelector", "namespaceSelector", "podSelector",
        "resourceAttributes"}
def leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in FREE:
            yield from leaves(v, path + ".")
        else:
            yield path
missing = [p for p in leaves(values) if f"`{p}`" not in readme]
if missing:
    sys.exit("not in README.md: " + ", ".join(missing))
PY

section "helm lint --strict"
run "helm lint (default values)" helm lint --strict "${CHART}"
for f in "${ROOT}"/helm/ci-values-*.yaml; do
  run "helm lint (-f ${f#"${ROOT}/"})" helm lint --strict "${CHART}" -f "${f}"
done

section "required values"
if helm template t "${CHART}" >"${WORK}/out" 2>&1; then
  fail "rendering without serialNumber must fail"
elif grep -q "serialNumber is required" "${WORK}/out"; then
  pass "rendering without serialNumber fails with a clear message"
else
  sed 's/^/        /' "${WORK}/out"
  fail "rendering without serialNumber fails, but without the expected message"
fi

# A callers file for the profiles that keep the default auth.mode enforce: one token
# caller (the digest of a token nobody holds).
CALLERS="${WORK}/callers.toml"
printf '[[caller]]\nname = "ci-operator"\nrole = "operator"\ntoken_sha256 = "%s"\n' \
  "$(printf 'ci-token' | sha256sum | cut -c1-64)" >"${CALLERS}"
if helm template t "${CHART}" --set serialNumber=CI-DEFAULTS >"${WORK}/out" 2>&1; then
  fail "rendering auth.mode enforce without callers must fail"
elif grep -q "auth.mode enforce needs callers" "${WORK}/out" && grep -q "auth.callers" "${WORK}/out" \
  && grep -q "auth.existingSecret" "${WORK}/out"; then
  pass "rendering auth.mode enforce without callers fails with a clear message"
else
  sed 's/^/        /' "${WORK}/out"
  fail "rendering auth.mode enforce without callers fails, but without the expected message"
fi

# Every setting of the service; the chart must give each one to the container
# (ConfigMap via envFrom, or env). licensing_server.url and license_file exclude each
# other, so the all-on profile has the licensing server and the existing-secrets profile
# the license file.
SETTINGS_ALL_ON="LICENSING_LISTEN_ADDR LICENSING_METRICS_ADDR LICENSING_REDIS_URL
LICENSING_REDIS_PASSWORD LICENSING_REDIS_TIMEOUT_MS LICENSING_SERIAL_NUMBER LICENSING_EDITION
LICENSING_TRYOUT__DAYS LICENSING_TRYOUT__SEATS
LICENSING_VENDOR_PUBLIC_KEY LICENSING_LOG__FORMAT LICENSING_LOG__LEVEL
LICENSING_TRACE__LEVEL LICENSING_TRACE__SAMPLING_RATIO
LICENSING_DRAIN_TIMEOUT_MS LICENSING_MIRROR__STALE_AFTER_MS
LICENSING_MIRROR__RESYNC_INTERVAL_MS LICENSING_CONSISTENCY__MAX_WAIT_MS
LICENSING_TLS__CERT_FILE LICENSING_TLS__KEY_FILE
LICENSING_OVER_CAPACITY_GRACE_DAYS LICENSING_GRACE_DAYS LICENSING_LAPSE_ACTION
LICENSING_LICENSING_SERVER__URL LICENSING_LICENSING_SERVER__CA_FILE
LICENSING_LICENSING_SERVER__TIMEOUT_MS LICENSING_RECONCILE__INTERVAL_SECS
LICENSING_RECONCILE__JITTER_PERCENT LICENSING_INITIALIZATION__CODE_TTL_MINUTES
LICENSING_REDIS_USERNAME LICENSING_REDIS_WAIT_REPLICAS LICENSING_REDIS_WAIT_TIMEOUT_MS
LICENSING_REDIS_TLS_CA_FILE
LICENSING_TLS__CLIENT_CA_FILE LICENSING_TLS__REQUIRE_CLIENT_CERTIFICATE LICENSING_AUTH__MODE
LICENSING_AUTH__CALLERS_FILE LICENSING_AUTH__RELOAD_INTERVAL_MS LICENSING_AUDIT__MAX_ENTRIES LICENSING_AUDIT__MAX_AGE_DAYS
LICENSING_DEVELOPMENT_INSTALLATION LICENSING_STATE_DIR
OTEL_EXPORTER_OTLP_ENDPOINT OTEL_SERVICE_NAME"
SETTINGS_EXISTING_SECRETS="LICENSING_LICENSE_FILE LICENSING_REDIS_PASSWORD
LICENSING_VENDOR_PUBLIC_KEY LICENSING_TLS__CERT_FILE LICENSING_TLS__KEY_FILE
LICENSING_TLS__CLIENT_CA_FILE LICENSING_AUTH__CALLERS_FILE"

section "the chart README's licensing-agent sidecar pod"
if "${PY}" - "${CHART}/README.md" "${WORK}/agent-pod.yaml" <<'PY' >"${WORK}/agent.log" 2>&1; then
import re, sys, yaml
text = open(sys.argv[1]).read()
m = re.search(r"<!-- agent-sidecar-pod -->\n```yaml\n(.*?)```", text, re.S)
if not m:
    sys.exit("no <!-- agent-sidecar-pod --> yaml block in the chart README")
pod = yaml.safe_load(m.group(1))
names = [c["name"] for c in pod["spec"]["containers"]]
assert "licensing-agent" in names, names
agent = next(c for c in pod["spec"]["containers"] if c["name"] == "licensing-agent")
assert agent["command"] == ["/usr/local/bin/licensing-agent"], agent["command"]
open(sys.argv[2], "w").write(m.group(1))
PY
  for v in ${KUBE_VERSIONS}; do
    if kubernetes-validate --strict -k "${v}" "${WORK}/agent-pod.yaml" >"${WORK}/agent-kv.log" 2>&1 \
      && ! grep -qE '^(WARN|ERROR|FATAL)' "${WORK}/agent-kv.log"; then
      pass "sidecar pod: kubernetes-validate --strict -k ${v}"
    else
      sed 's/^/        /' "${WORK}/agent-kv.log"
      fail "sidecar pod: kubernetes-validate --strict -k ${v}"
    fi
  done
else
  sed 's/^/        /' "${WORK}/agent.log"
  fail "sidecar pod: extract from the chart README"
fi

# check_profile NAME HELM-ARGS...
check_profile() {
  local name="$1"; shift
  local dir="${WORK}/${name}"
  mkdir -p "${dir}"
  section "profile ${name}"
  if ! helm template t "${CHART}" --namespace pbx "$@" >"${dir}/all.yaml" 2>"${dir}/err"; then
    sed 's/^/        /' "${dir}/err"
    fail "${name}: helm template"
    return
  fi
  pass "${name}: helm template"

  # Split: kinds with a Kubernetes schema vs. CRD kinds (ServiceMonitor).
  if ! "${PY}" - "${dir}" <<'PY' >"${dir}/split.log" 2>&1; then
import json, sys, yaml
d = sys.argv[1]
docs = [x for x in yaml.safe_load_all(open(f"{d}/all.yaml")) if x]
crd_groups = ("monitoring.coreos.com/",)
core = [x for x in docs if not x["apiVersion"].startswith(crd_groups)]
crds = [x for x in docs if x["apiVersion"].startswith(crd_groups)]
with open(f"{d}/core.yaml", "w") as f:
    yaml.safe_dump_all(core, f, sort_keys=False)
json.dump(crds, open(f"{d}/crds.json", "w"))
print(f"{len(core)} core resources: " + ", ".join(sorted(x["kind"] for x in core)))
print(f"{len(crds)} CRD resources: " + ", ".join(sorted(x["kind"] for x in crds)))
PY
    sed 's/^/        /' "${dir}/split.log"
    fail "${name}: parse rendered manifests"
    return
  fi
  sed 's/^/        /' "${dir}/split.log"

  local v
  for v in ${KUBE_VERSIONS}; do
    kubernetes-validate --strict -k "${v}" "${dir}/core.yaml" >"${dir}/kv.log" 2>&1
    local rc=$?
    # A resource without a schema is only a warning for kubernetes-validate: count it as
    # a failure here, since every kind in core.yaml must be known.
    if [ "${rc}" -eq 0 ] && ! grep -qE '^(WARN|ERROR|FATAL)' "${dir}/kv.log"; then
      pass "${name}: kubernetes-validate --strict -k ${v} ($(grep -c '^INFO' "${dir}/kv.log") resources)"
    else
      grep -vE '^INFO' "${dir}/kv.log" | sed 's/^/        /'
      fail "${name}: kubernetes-validate --strict -k ${v}"
    fi
  done

  if [ "$("${PY}" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "${dir}/crds.json")" -gt 0 ]; then
    run "${name}: ServiceMonitor/PrometheusRule against the prometheus-operator schemas" \
      node "${ROOT}/scripts/validate-crds.mjs" "${dir}/crds.json"
  fi

  run "${name}: PrometheusRule and dashboard rendered from files/ (when enabled)" \
    "${PY}" - "${dir}/all.yaml" "${CHART}/files" "${CHART}/values.yaml" "$@" <<'PY'
import json, sys, yaml
docs = [x for x in yaml.safe_load_all(open(sys.argv[1])) if x]
files = sys.argv[2]
rules = yaml.safe_load(open(f"{files}/alerts.yaml"))
# The runbook base URL of this profile: the chart's default, or that of a -f values file.
base = yaml.safe_load(open(sys.argv[3]))["prometheusRule"]["runbookBaseUrl"]
args = sys.argv[4:]
for flag, value in zip(args, args[1:]):
    if flag == "-f":
        base = (yaml.safe_load(open(value)).get("prometheusRule") or {}).get("runbookBaseUrl", base)
base = base.rstrip("/")
for d in docs:
    if d["kind"] == "PrometheusRule":
        want = [r["alert"] for g in rules["groups"] for r in g["rules"]]
        got = [r["alert"] for g in d["spec"]["groups"] for r in g["rules"]]
        assert got == want, f"PrometheusRule alerts {got} != {want}"
        for g in d["spec"]["groups"]:
            for r in g["rules"]:
                assert r["labels"].get("severity") and r["annotations"].get("summary") \
                    and r["annotations"].get("description") and r["annotations"].get("runbook_url"), r["alert"]
                want = f"{base}#{r['alert'].lower()}"
                assert r["annotations"]["runbook_url"] == want, \
                    f"{r['alert']}: runbook_url {r['annotations']['runbook_url']!r} != {want!r}"
    if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard"):
        (text,) = d["data"].values()
        assert json.loads(text) == json.load(open(f"{files}/dashboard.json")), "dashboard differs"
PY

  local settings=""
  case "${name}" in
    all-on) settings="${SETTINGS_ALL_ON}" ;;
    existing-secrets) settings="${SETTINGS_EXISTING_SECRETS}" ;;
  esac
  if [ -n "${settings}" ]; then
    local missing=()
    local s
    for s in ${settings}; do
      grep -qE "(^|[[:space:]])(- name: )?${s}:?([[:space:]]|$)" "${dir}/all.yaml" || missing+=("${s}")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
      pass "${name}: every service setting reaches the container"
    else
      fail "${name}: settings not given to the container: ${missing[*]}"
    fi
  fi
}

check_profile defaults --set serialNumber=CI-DEFAULTS --set-file auth.callers="${CALLERS}"

# The defaults are secure: TLS with a certificate the chart generated for the Service's
# names (verified with openssl against the CA it publishes), auth.mode enforce, and a
# NetworkPolicy in front of the pods; the kubelet's gRPC probes ask the metrics port,
# which serves health in plaintext.
check_secure_defaults() {
  local dir="${WORK}/defaults"
  if ! "${PY}" - "${dir}" <<'PY' >"${dir}/secure.log" 2>&1; then
import base64, sys, yaml
d = sys.argv[1]
docs = [x for x in yaml.safe_load_all(open(f"{d}/all.yaml")) if x]
kinds = {x["kind"] for x in docs}
assert "NetworkPolicy" in kinds, "no NetworkPolicy by default"
config = next(x for x in docs if x["kind"] == "ConfigMap" and "LICENSING_AUTH__MODE" in x.get("data", {}))
assert config["data"]["LICENSING_AUTH__MODE"] == "enforce", config["data"]["LICENSING_AUTH__MODE"]
assert config["data"].get("LICENSING_TLS__CERT_FILE"), "TLS is off by default"
tls = [x for x in docs if x["kind"] == "Secret" and x.get("type") == "kubernetes.io/tls"]
assert len(tls) == 1, f"{len(tls)} TLS Secrets"
for key in ("tls.crt", "tls.key", "ca.crt"):
    open(f"{d}/{key}", "wb").write(base64.b64decode(tls[0]["data"][key]))
deployment = next(x for x in docs if x["kind"] == "Deployment")
container = deployment["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
    grpc = container[probe].get("grpc")
    assert grpc and grpc["port"] == ports["metrics"], f"{probe}: {container[probe]}"
print("NetworkPolicy, auth.mode enforce, TLS Secret with a generated certificate, "
      "gRPC probes on the metrics port")
PY
    sed 's/^/        /' "${dir}/secure.log"
    fail "defaults: secure (TLS, enforce, NetworkPolicy)"
    return
  fi
  pass "defaults: secure ($(cat "${dir}/secure.log"))"
  run "defaults: the generated certificate verifies against the published CA for the Service's name" \
    openssl verify -CAfile "${dir}/ca.crt" -verify_hostname t-comtrexx-licensing.pbx.svc "${dir}/tls.crt"
  if [ "$(openssl x509 -in "${dir}/tls.crt" -noout -pubkey)" = "$(openssl pkey -in "${dir}/tls.key" -pubout)" ]; then
    pass "defaults: the generated key belongs to the certificate"
  else
    fail "defaults: the generated key belongs to the certificate"
  fi
}
check_secure_defaults

check_profile all-on -f "${ROOT}/helm/ci-values-all.yaml"
check_profile existing-secrets -f "${ROOT}/helm/ci-values-existing-secrets.yaml"

echo
if [ "${#failures[@]}" -eq 0 ]; then
  echo "check-deploy: all checks passed"
  exit 0
fi
echo "check-deploy: ${#failures[@]} check(s) failed:"
printf '  - %s\n' "${failures[@]}"
exit 1

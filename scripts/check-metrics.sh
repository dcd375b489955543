#!/usr/bin/env bash
# Checks the metrics as an operator's tools see them, on a live service:
#
#   scripts/check-metrics.sh
#
# 1. starts a redis-server of its own (free loopback port, no persistence) and the
#    service against it (debug build; a development vendor key and licenses);
# 2. drives every kind of activity with grpcurl (fresh start, tryout and a test seat,
#    license applied by reconcile and purchased seats, a smaller license that leaves
#    seats over capacity, a rejected document, a Redis outage), scraping /metrics
#    after each and running `promtool check metrics` on the scrape (no errors and no
#    lint warnings allowed); the OpenMetrics form (what Prometheus asks for) is
#    scraped too and must end with `# EOF`;
# 3. checks that every metric the Grafana dashboard and the alert rules use exists in
#    those scrapes (scripts/promql-metrics.py; `up` is Prometheus's own);
# 4. `promtool check rules` and `promtool test rules` on the alert rules, and that every
#    alert has severity, summary, description and a runbook section in docs/runbooks.md
#    (its runbook_url: the placeholder base URL of files/alerts.yaml, "#", the section).
#
# Needs grpcurl, promtool (scripts/install-tools.sh), redis-server and python3.
# Environment: CHECK_METRICS_BIN (a built binary instead of `cargo build`),
# CHECK_METRICS_KEEP=1 (keep the scrapes and logs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART_FILES="${ROOT}/helm/comtrexx-licensing/files"
# shellcheck source=scripts/tools-env.sh
source "${ROOT}/scripts/tools-env.sh"
PY="${ROOT}/.tools/venv/bin/python"
SERIAL="METRICS-0001"

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
for tool in grpcurl promtool redis-server redis-cli python3; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found; run scripts/install-tools.sh"
done

# The service reads every LICENSING_* variable: start from a clean slate.
while IFS= read -r var; do unset "${var}"; done < <(compgen -e | grep '^LICENSING_' || true)

if [ -n "${CHECK_METRICS_BIN:-}" ]; then
  BIN="${CHECK_METRICS_BIN}"
else
  (cd "${ROOT}" && cargo build --quiet --bin comtrexx-licensing) || die "cargo build failed"
  BIN="${ROOT}/target/debug/comtrexx-licensing"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-metrics.XXXXXX")"
REDIS_PID=""
SERVER_PID=""
cleanup() {
  local status=$?
  for pid in "${SERVER_PID}" "${REDIS_PID}"; do
    if [ -n "${pid}" ]; then
      kill "${pid}" 2>/dev/null || true
      wait "${pid}" 2>/dev/null || true
    fi
  done
  if [ "${CHECK_METRICS_KEEP:-}" = "1" ]; then echo "kept ${WORK}"; else rm -rf "${WORK}"; fi
  exit "${status}"
}
trap cleanup EXIT

FAILED=0
pass() { printf 'ok    %s\n' "$1"; }
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s\n' "$1"
  if [ -n "${2:-}" ] && [ -s "$2" ]; then head -n 30 "$2" | sed 's/^/      | /'; fi
}

# get_metrics [ACCEPT]: GETs /metrics (python3, so that no HTTP client is needed).
get_metrics() {
  python3 - "http://${METRICS}/metrics" "${1:-}" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    req.add_header("Accept", sys.argv[2])
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.read().decode())
PY
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for DESCRIPTION SECONDS CMD...: polls CMD until it succeeds (bounded).
wait_for() {
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "${SECONDS}" -lt "${deadline}" ] || die "${what}: not within ${seconds} s (server log: ${WORK}/server.log)
$(tail -n 20 "${WORK}/server.log" 2>/dev/null)"
    sleep 0.1
  done
}

# --- Redis, keys, licenses -----------------------------------------------------------
REDIS_PORT="$(free_port)"
redis-server --port "${REDIS_PORT}" --bind 127.0.0.1 --save '' --appendonly no \
  >"${WORK}/redis.log" 2>&1 &
REDIS_PID=$!
wait_for "redis-server answers" 20 redis-cli -p "${REDIS_PORT}" ping

"${BIN}" dev keygen --out "${WORK}/vendor.key" >"${WORK}/vendor.pub"
"${BIN}" dev keygen --out "${WORK}/other.key" >/dev/null
sign() { # sign KEY OUT ISSUED-AT ENTITLEMENT...
  local key="$1" out="$2" issued="$3"; shift 3
  local args=()
  for e in "$@"; do args+=(--entitlement "${e}"); done
  "${BIN}" dev sign-license --key "${key}" --serial "${SERIAL}" --edition vm \
    --issued-at "${issued}" "${args[@]}" --out "${out}"
}
sign "${WORK}/vendor.key" "${WORK}/license-3.json" 2026-01-01T00:00:00Z user=3 call_assist=1
sign "${WORK}/vendor.key" "${WORK}/license-1.json" 2026-02-01T00:00:00Z user=1 call_assist=1
sign "${WORK}/other.key" "${WORK}/license-forged.json" 2026-03-01T00:00:00Z user=100
LICENSE="${WORK}/license.json"

# --- the service ---------------------------------------------------------------------
GRPC="127.0.0.1:$(free_port)"
METRICS="127.0.0.1:$(free_port)"
env LICENSING_LISTEN_ADDR="${GRPC}" LICENSING_METRICS_ADDR="${METRICS}" \
  LICENSING_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}" LICENSING_SERIAL_NUMBER="${SERIAL}" \
  LICENSING_EDITION=vm LICENSING_LICENSE_FILE="${LICENSE}" \
  LICENSING_VENDOR_PUBLIC_KEY="$(cat "${WORK}/vendor.pub")" \
  LICENSING_MIRROR__STALE_AFTER_MS=500 LICENSING_DRAIN_TIMEOUT_MS=0 \
  "${BIN}" serve >"${WORK}/server.log" 2>&1 &
SERVER_PID=$!
wait_for "the service answers gRPC" 60 grpcurl -plaintext -max-time 2 "${GRPC}" list

rpc() { # rpc METHOD [JSON]
  grpcurl -plaintext -d "${2:-{\}}" "${GRPC}" "comtrexx.licensing.v1.LicensingService/$1"
}
overview_has() { rpc GetLicenseOverview | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(not ($1))"; }
# The start-up reconcile (license file not there yet) is recorded before anything else.
wait_for "the start-up reconcile is recorded" 30 overview_has 'd.get("lastReconcileOutcome")'

# --- scrape and lint after each kind of activity ---------------------------------------
SCRAPES=()
scrape() { # scrape NAME: promtool on the text form, structure check on OpenMetrics
  local name="$1" file="${WORK}/scrape-$1.txt"
  get_metrics >"${file}" || { fail "${name}: scrape"; return; }
  SCRAPES+=("${file}")
  if promtool check metrics <"${file}" >"${WORK}/lint-${name}.txt" 2>&1 && [ ! -s "${WORK}/lint-${name}.txt" ]; then
    pass "${name}: promtool check metrics is clean ($(grep -vc '^#' "${file}") samples)"
  else
    fail "${name}: promtool check metrics" "${WORK}/lint-${name}.txt"
  fi
  get_metrics 'application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5' \
    >"${WORK}/om-${name}.txt"
  if [ "$(tail -n 1 "${WORK}/om-${name}.txt")" = "# EOF" ]; then
    pass "${name}: OpenMetrics form ends with # EOF"
  else
    fail "${name}: OpenMetrics form ends with # EOF" "${WORK}/om-${name}.txt"
  fi
}
sample() { # sample NAME SELECTOR-PREFIX: the value of the first matching sample
  grep -F "$2" "${WORK}/scrape-$1.txt" | head -n 1 | awk '{print $NF}'
}
expect() { # expect DESCRIPTION SCRAPE PREFIX VALUE
  local got
  got="$(sample "$2" "$3")"
  if [ -n "${got}" ] && awk -v a="${got}" -v b="$4" 'BEGIN { exit !(a + 0 == b + 0) }'; then pass "$1"; else
    echo "${3}: got '${got}', want '$4'" >"${WORK}/why"
    fail "$1" "${WORK}/why"
  fi
}

scrape fresh
expect "fresh: activation not initialized" fresh 'licensing_activation_state{state="not_initialized"}' 1

rpc StartTryout >/dev/null
rpc AssignSeat '{"user_id":"alice"}' >/dev/null
rpc CheckSeat '{"user_id":"alice"}' >/dev/null
rpc CheckSeat '{"user_id":"nobody","feature":"nope"}' >/dev/null 2>&1 || true
scrape tryout
expect "tryout: one test seat in use" tryout 'licensing_seats_in_use{feature="user",source="tryout"}' 1
expect "tryout: state active" tryout 'licensing_tryout_state{state="active"}' 1

cp "${WORK}/license-3.json" "${LICENSE}"
rpc Reconcile >/dev/null
for u in alice bob carol; do rpc AssignSeat "{\"user_id\":\"${u}\"}" >/dev/null; done
rpc AssignSeat '{"user_id":"dave"}' >/dev/null 2>&1 || true
rpc ListSeats >/dev/null
scrape licensed
expect "licensed: 3 of 3 purchased user seats" licensed 'licensing_seats_in_use{feature="user",source="purchased"}' 3
expect "licensed: capacity 3" licensed 'licensing_seats_capacity{feature="user",source="purchased"}' 3

cp "${WORK}/license-1.json" "${LICENSE}"
rpc Reconcile >/dev/null
scrape over-capacity
expect "over capacity: 2 user seats beyond the license" over-capacity 'licensing_seats_over_capacity{feature="user"}' 2

cp "${WORK}/license-forged.json" "${LICENSE}"
rpc Reconcile >/dev/null || true
scrape rejected
expect "rejected: last outcome rejected" rejected 'licensing_reconcile_last_outcome{outcome="rejected"}' 1

kill "${REDIS_PID}"; wait "${REDIS_PID}" 2>/dev/null || true; REDIS_PID=""
rpc AssignSeat '{"user_id":"erin"}' >/dev/null 2>&1 || true
stale() { get_metrics | awk '$1 == "licensing_mirror_stale" && $2 == 1 { found = 1 } END { exit !found }'; }
wait_for "the mirror reports stale after Redis is gone" 30 stale
scrape redis-down
if awk '/^licensing_redis_errors_total/ {s += $NF} END {exit !(s > 0)}' "${WORK}/scrape-redis-down.txt"; then
  pass "redis down: Redis errors counted"
else
  fail "redis down: Redis errors counted"
fi

# --- the dashboard and the rules use only exported metrics ------------------------------
cat "${SCRAPES[@]}" | grep -v '^#' | sed -E 's/[{ ].*//' | sort -u >"${WORK}/exported.txt"
echo up >>"${WORK}/exported.txt"   # made by Prometheus for every target
check_uses() { # check_uses KIND FILE
  local missing="${WORK}/missing-$1.txt"
  "${PY}" "${ROOT}/scripts/promql-metrics.py" "$1" "$2" >"${WORK}/uses-$1.txt" || { fail "$1: parse $2" "${WORK}/uses-$1.txt"; return; }
  awk -F '\t' 'NR == FNR { have[$1] = 1; next } !($1 in have)' "${WORK}/exported.txt" "${WORK}/uses-$1.txt" >"${missing}"
  if [ -s "${missing}" ]; then
    fail "$1: metrics used but not exported" "${missing}"
  else
    pass "$1: all $(cut -f1 "${WORK}/uses-$1.txt" | sort -u | wc -l) metrics used are exported (${2#"${ROOT}/"})"
  fi
}
check_uses dashboard "${CHART_FILES}/dashboard.json"
check_uses rules "${CHART_FILES}/alerts.yaml"

# --- alert rules ----------------------------------------------------------------------
if promtool check rules "${CHART_FILES}/alerts.yaml" >"${WORK}/rules.txt" 2>&1; then
  pass "promtool check rules"
else
  fail "promtool check rules" "${WORK}/rules.txt"
fi
if promtool test rules "${ROOT}/helm/tests/alerts.test.yaml" >"${WORK}/rules-test.txt" 2>&1; then
  pass "promtool test rules ($(grep -c 'alertname:' "${ROOT}/helm/tests/alerts.test.yaml") cases)"
else
  fail "promtool test rules" "${WORK}/rules-test.txt"
fi

if "${PY}" - "${CHART_FILES}/alerts.yaml" "${ROOT}/docs/runbooks.md" "${CHART_FILES}/../values.yaml" >"${WORK}/runbooks.txt" 2>&1 <<'PY'
import re, sys, yaml
rules = [r for g in yaml.safe_load(open(sys.argv[1]))["groups"] for r in g["rules"]]
doc = open(sys.argv[2], encoding="utf-8").read()
# The plain file's placeholder base is the chart's default runbookBaseUrl.
base = yaml.safe_load(open(sys.argv[3]))["prometheusRule"]["runbookBaseUrl"]
problems = []
for r in rules:
    name = r["alert"]
    if not r.get("labels", {}).get("severity"):
        problems.append(f"{name}: no severity")
    for a in ("summary", "description", "runbook_url"):
        if not r.get("annotations", {}).get(a):
            problems.append(f"{name}: no {a}")
    if r.get("annotations", {}).get("runbook_url") != f"{base}#{name.lower()}":
        problems.append(f"{name}: runbook_url is not {base}#{name.lower()}")
    if not re.search(rf"^### {name}$", doc, re.M):
        problems.append(f"{name}: no section '### {name}' in docs/runbooks.md")
if problems:
    sys.exit("\n".join(problems))
print(len(rules))
PY
then
  pass "every alert has severity, summary, description and a runbook section ($(cat "${WORK}/runbooks.txt") alerts)"
else
  fail "every alert has severity, summary, description and a runbook section" "${WORK}/runbooks.txt"
fi

if [ "${FAILED}" -gt 0 ]; then
  echo "server log (last lines):"; tail -n 15 "${WORK}/server.log" | sed 's/^/      | /'
  die "${FAILED} check(s) failed; rerun with CHECK_METRICS_KEEP=1 to keep the scrapes"
fi
echo "check-metrics: all checks passed"

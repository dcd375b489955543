#!/usr/bin/env bash
# Runs the grpcurl recipes of docs/grpcurl-recipes.md against a local server and checks them.
#
#   scripts/grpcurl-recipes.sh
#
# What it does:
#   1. builds the service (`cargo build --quiet`, debug profile);
#   2. makes a development vendor key and a signed license (edition vm, user=5,
#      call_assist=1) with `comtrexx-licensing dev keygen` / `dev sign-license`, in a
#      temporary directory;
#   3. starts the server on a free loopback port with the embedded in-memory store and
#      metrics disabled; the license file is configured but not there yet, so that the
#      story of the recipes can begin on a fresh PBX (tryout) and apply the license later.
#      Callers: a bearer token made with `comtrexx-licensing auth token` ($TOKEN, role
#      call_handling) and a client certificate (openssl, a CA of its own, in $CERTS).
#      A second server ($TLS_ADDR) serves mTLS with auth.mode = enforce, and its
#      metrics and plaintext health on $METRICS_ADDR;
#   4. waits (bounded) until the overview records the start-up reconcile, which the
#      recipes' story begins after; smoke-checks the server through reflection only
#      (list, describe, health);
#   5. extracts every fenced ```sh block of docs/grpcurl-recipes.md whose first line is
#      `# recipe: NAME` and runs them in document order with $ADDR set. A recipe passes
#      when it exits 0, or, when the block also has a line `# expect: CODE` (a grpcurl
#      code name such as ResourceExhausted), when it fails and its output names that code.
#      Just before the recipe named `Reconcile`, the license file is put in place;
#   6. checks the JSON that some recipes printed (e.g. CheckSeat after AssignSeat says
#      "licensed": true). grpcurl omits fields with default values ("licensed": false is
#      simply absent), so the checks use d.get(...).
#
# Every check prints `ok` or `FAIL`; the last line is `N passed, M failed`. The exit
# status is 0 only when nothing failed.
#
# Needs grpcurl (1.8 or newer), openssl and python3. grpcurl comes with scripts/install-tools.sh;
# when it is not on PATH, this script tries the project-local .tools/ (scripts/tools-env.sh).
#
# Environment (all optional):
#   RECIPES_BIN              use this binary instead of building target/debug/comtrexx-licensing
#   RECIPES_DOC              the document to take the recipes from (default docs/grpcurl-recipes.md)
#   RECIPES_KEEP=1           keep the temporary directory (recipe outputs in out/, server.log)
#   RECIPES_STARTUP_TIMEOUT  seconds to wait for the server (default 60)
# LICENSING_* variables of the calling shell are ignored: the server gets exactly the
# configuration below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOC="${RECIPES_DOC:-${ROOT}/docs/grpcurl-recipes.md}"
STARTUP_TIMEOUT="${RECIPES_STARTUP_TIMEOUT:-60}"
SERIAL="0123456789AB"
SERVICE="comtrexx.licensing.v1.LicensingService"
# The RPCs of the API contract (proto/comtrexx/licensing/v1/licensing.proto); each needs a recipe.
RPCS=(CheckSeat AssignSeat ReleaseSeat ListSeats GetTryoutStatus StartTryout EndTryout
  GetLicenseOverview Reconcile CreateInitializationCode ApplyActivation WatchLicenseEvents
  ResetActivation ActivateOnline WatchSeats AcquireLease RenewLeases ReleaseLease ListLeases)

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# --- prerequisites -------------------------------------------------------------------
# The service reads every LICENSING_* variable as configuration (unknown ones are
# errors): start from a clean slate.
while IFS= read -r var; do
  unset "${var}"
done < <(compgen -e | grep '^LICENSING_' || true)

command -v python3 >/dev/null 2>&1 || die "python3 is required"
command -v openssl >/dev/null 2>&1 || die "openssl is required (client certificates for the mTLS recipes)"
if ! command -v grpcurl >/dev/null 2>&1 && [ -f "${ROOT}/scripts/tools-env.sh" ]; then
  # shellcheck source=scripts/tools-env.sh
  source "${ROOT}/scripts/tools-env.sh"
fi
command -v grpcurl >/dev/null 2>&1 \
  || die "grpcurl is not on PATH: run scripts/install-tools.sh, then 'source scripts/tools-env.sh'"
[ -f "${DOC}" ] || die "recipe document ${DOC} not found"

if [ -n "${RECIPES_BIN:-}" ]; then
  BIN="${RECIPES_BIN}"
else
  echo "==> cargo build --quiet"
  (cd "${ROOT}" && cargo build --quiet) || die "cargo build failed"
  BIN="${ROOT}/target/debug/comtrexx-licensing"
fi
[ -x "${BIN}" ] || die "service binary ${BIN} not found or not executable"

# --- temporary directory and cleanup -------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grpcurl-recipes.XXXXXX")"
SERVER_PID=""
TLS_SERVER_PID=""

cleanup() {
  local status=$?
  if [ -n "${TLS_SERVER_PID}" ]; then
    kill -TERM "${TLS_SERVER_PID}" 2>/dev/null || true
    wait "${TLS_SERVER_PID}" 2>/dev/null || true
  fi
  if [ -n "${SERVER_PID}" ] && kill -0 "${SERVER_PID}" 2>/dev/null; then
    kill -TERM "${SERVER_PID}" 2>/dev/null || true
    # drain_timeout_ms is 1000 below; give it a little more, then insist.
    for _ in $(seq 1 30); do
      kill -0 "${SERVER_PID}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${SERVER_PID}" 2>/dev/null || true
    wait "${SERVER_PID}" 2>/dev/null || true
  fi
  if [ "${RECIPES_KEEP:-}" = "1" ]; then
    echo "kept ${WORK} (recipe outputs in out/, server log in server.log)"
  else
    rm -rf "${WORK}"
  fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "${WORK}/out" "${WORK}/recipes" "${WORK}/run" "${WORK}/license"

# --- checks bookkeeping --------------------------------------------------------------
PASSED=0
FAILED=0

pass() {
  PASSED=$((PASSED + 1))
  printf 'ok    %s\n' "$1"
}

# fail DESCRIPTION [DETAILS_FILE]
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s\n' "$1"
  if [ -n "${2:-}" ] && [ -s "$2" ]; then
    head -n 25 "$2" | sed 's/^/      | /'
  fi
}

# --- development key and license -----------------------------------------------------
# shellcheck source=scripts/dev-licenses.sh
source "${ROOT}/scripts/dev-licenses.sh"
# A vendor key and two documents: 5 users and one call_assist seat, then the
# same with call_assist sold for concurrent use (two at a time), applied later.
dev_licenses "${BIN}" "${WORK}" "${SERIAL}" 5
# Where the server looks for the license; filled just before the Reconcile recipe.
LICENSE_FILE="${WORK}/license/license.json"

# --- callers: a token and a client certificate ---------------------------------------
"${BIN}" auth token --name recipes-pbx --role call_handling \
  >"${WORK}/token" 2>"${WORK}/callers.toml" || die "auth token failed: $(cat "${WORK}/callers.toml")"
TOKEN="$(cat "${WORK}/token")"
CERTS="${WORK}/certs"
mkdir -p "${CERTS}"
(
  cd "${CERTS}"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=recipes CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout server.key -out server.csr
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
    -out server.pem
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=admin-ui" \
    -keyout client.key -out client.csr
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile <(printf 'subjectAltName=URI:spiffe://pbx.local/ns/pbx/sa/admin-ui\nextendedKeyUsage=clientAuth\n') \
    -out client.pem
) >"${WORK}/openssl.log" 2>&1 || die "openssl failed: $(tail -n 5 "${WORK}/openssl.log")"
cat >>"${WORK}/callers.toml" <<'TOML'

[[caller]]
name = "admin-ui"
role = "user_management"
certificate = "spiffe://pbx.local/ns/pbx/sa/admin-ui"
TOML

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADDR="127.0.0.1:${PORT}"

SERVER_ENV=(
  "LICENSING_LISTEN_ADDR=${ADDR}"
  "LICENSING_METRICS_ADDR="
  "LICENSING_SERIAL_NUMBER=${SERIAL}"
  "LICENSING_EDITION=vm"
  "LICENSING_LICENSE_FILE=${LICENSE_FILE}"
  "LICENSING_VENDOR_PUBLIC_KEY=$(cat "${WORK}/vendor.pub")"
  "LICENSING_DRAIN_TIMEOUT_MS=1000"
  "LICENSING_AUTH__CALLERS_FILE=${WORK}/callers.toml"
)
TLS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TLS_ADDR="127.0.0.1:${TLS_PORT}"
METRICS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
METRICS_ADDR="127.0.0.1:${METRICS_PORT}"
TLS_SERVER_ENV=(
  "${SERVER_ENV[@]}"
  "LICENSING_LISTEN_ADDR=${TLS_ADDR}"
  "LICENSING_METRICS_ADDR=${METRICS_ADDR}"
  "LICENSING_AUTH__MODE=enforce"
  "LICENSING_TLS__CERT_FILE=${CERTS}/server.pem"
  "LICENSING_TLS__KEY_FILE=${CERTS}/server.key"
  "LICENSING_TLS__CLIENT_CA_FILE=${CERTS}/ca.pem"
)

# --- the effective configuration -----------------------------------------------------
if env "${SERVER_ENV[@]}" "${BIN}" config >"${WORK}/out/config.txt" 2>&1 \
  && grep -q "^serial_number = \"${SERIAL}\"" "${WORK}/out/config.txt" \
  && grep -q '^metrics_addr = ""' "${WORK}/out/config.txt"; then
  pass "comtrexx-licensing config prints the effective configuration"
else
  fail "comtrexx-licensing config prints the effective configuration" "${WORK}/out/config.txt"
fi

# --- start the server ----------------------------------------------------------------
echo "==> starting ${BIN##*/} on ${ADDR} (in-memory store, serial ${SERIAL})"
env "${SERVER_ENV[@]}" "${BIN}" serve >"${WORK}/server.log" 2>&1 &
SERVER_PID=$!

deadline=$((SECONDS + STARTUP_TIMEOUT))
until grpcurl -plaintext -max-time 2 "${ADDR}" list >/dev/null 2>&1; do
  if ! kill -0 "${SERVER_PID}" 2>/dev/null; then
    SERVER_PID=""
    die "the server exited during start-up; its log:
$(tail -n 30 "${WORK}/server.log")"
  fi
  if [ "${SECONDS}" -ge "${deadline}" ]; then
    die "the server did not answer 'grpcurl -plaintext ${ADDR} list' within ${STARTUP_TIMEOUT} s; its log:
$(tail -n 30 "${WORK}/server.log")"
  fi
  sleep 0.2
done
echo "==> server answers on ${ADDR}"

echo "==> starting a second server with mTLS and auth.mode = enforce on ${TLS_ADDR}"
env "${TLS_SERVER_ENV[@]}" "${BIN}" serve >"${WORK}/tls-server.log" 2>&1 &
TLS_SERVER_PID=$!
deadline=$((SECONDS + STARTUP_TIMEOUT))
until grpcurl -cacert "${CERTS}/ca.pem" -cert "${CERTS}/client.pem" -key "${CERTS}/client.key" \
  -max-time 2 "${TLS_ADDR}" list >/dev/null 2>&1; do
  kill -0 "${TLS_SERVER_PID}" 2>/dev/null \
    || die "the mTLS server exited during start-up; its log:
$(tail -n 30 "${WORK}/tls-server.log")"
  [ "${SECONDS}" -lt "${deadline}" ] \
    || die "the mTLS server did not answer within ${STARTUP_TIMEOUT} s; its log:
$(tail -n 30 "${WORK}/tls-server.log")"
  sleep 0.2
done

# The recipes describe the PBX after its start-up reconcile (with no license file yet:
# lastReconcileError says so). It runs in the background shortly after start; wait
# for the overview to record it (bounded) instead of assuming it happened.
startup_reconciled() {
  grpcurl -plaintext -max-time 2 "${ADDR}" comtrexx.licensing.v1.LicensingService/GetLicenseOverview 2>/dev/null \
    | python3 -c 'import json, sys; sys.exit(not json.load(sys.stdin).get("lastReconcileOutcome"))'
}
deadline=$((SECONDS + STARTUP_TIMEOUT))
until startup_reconciled; do
  if [ "${SECONDS}" -ge "${deadline}" ]; then
    die "the start-up reconcile was not recorded within ${STARTUP_TIMEOUT} s; server log:
$(tail -n 30 "${WORK}/server.log")"
  fi
  sleep 0.2
done
echo "==> start-up reconcile recorded"

# --- smoke checks through reflection only ---------------------------------------------
smoke() {
  local description="$1"
  shift
  local out="${WORK}/out/smoke.txt"
  if "$@" >"${out}" 2>&1; then
    pass "${description}"
  else
    fail "${description}" "${out}"
  fi
}

list_has_services() {
  grpcurl -plaintext "${ADDR}" list >"${WORK}/out/smoke-list.txt" 2>&1 || {
    cat "${WORK}/out/smoke-list.txt"
    return 1
  }
  local missing=0
  grep -qx "${SERVICE}" "${WORK}/out/smoke-list.txt" || { echo "missing ${SERVICE}"; missing=1; }
  grep -qx 'grpc.health.v1.Health' "${WORK}/out/smoke-list.txt" || { echo "missing grpc.health.v1.Health"; missing=1; }
  grep -q '^grpc\.reflection\.' "${WORK}/out/smoke-list.txt" || { echo "missing grpc.reflection.*"; missing=1; }
  [ "${missing}" -eq 0 ] || { cat "${WORK}/out/smoke-list.txt"; return 1; }
}

describe_has_all_rpcs() {
  grpcurl -plaintext "${ADDR}" describe "${SERVICE}" >"${WORK}/out/smoke-describe.txt" 2>&1 || {
    cat "${WORK}/out/smoke-describe.txt"
    return 1
  }
  local rpc missing=()
  for rpc in "${RPCS[@]}"; do
    grep -Eq "^[[:space:]]*rpc ${rpc} \(" "${WORK}/out/smoke-describe.txt" || missing+=("${rpc}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "RPCs missing from describe: ${missing[*]}"
    return 1
  fi
}

describe_check_seat_response() {
  grpcurl -plaintext "${ADDR}" describe comtrexx.licensing.v1.CheckSeatResponse \
    >"${WORK}/out/smoke-describe-msg.txt" 2>&1 || { cat "${WORK}/out/smoke-describe-msg.txt"; return 1; }
  local field
  for field in 'bool licensed = 1;' 'SeatSource source = 2;' 'SeatReason reason = 3;' \
    'google.protobuf.Timestamp valid_until = 4;' 'bool stale = 5;'; do
    grep -qF "${field}" "${WORK}/out/smoke-describe-msg.txt" || {
      echo "missing field: ${field}"
      cat "${WORK}/out/smoke-describe-msg.txt"
      return 1
    }
  done
}

health_serving() {
  local service="$1"
  grpcurl -plaintext -d "{\"service\": \"${service}\"}" "${ADDR}" grpc.health.v1.Health/Check \
    >"${WORK}/out/smoke-health.txt" 2>&1 || { cat "${WORK}/out/smoke-health.txt"; return 1; }
  python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "SERVING")' \
    "${WORK}/out/smoke-health.txt" || { cat "${WORK}/out/smoke-health.txt"; return 1; }
}

smoke "list shows ${SERVICE}, grpc.health.v1.Health and reflection" list_has_services
smoke "describe ${SERVICE} lists all ${#RPCS[@]} RPCs of the contract" describe_has_all_rpcs
smoke "describe comtrexx.licensing.v1.CheckSeatResponse shows its five fields" describe_check_seat_response
smoke "grpc.health.v1.Health/Check for the server (\"\") is SERVING" health_serving ""
smoke "grpc.health.v1.Health/Check for ${SERVICE} is SERVING" health_serving "${SERVICE}"

# --- extract the recipes --------------------------------------------------------------
python3 - "${DOC}" "${WORK}/recipes" <<'PY' || die "could not extract the recipes from ${DOC}"
import os
import re
import sys

doc, outdir = sys.argv[1], sys.argv[2]
CODES = {
    "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
    "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
    "Unauthenticated",
}
lines = open(doc, encoding="utf-8").read().splitlines()
recipes, names, i = [], set(), 0
while i < len(lines):
    if re.fullmatch(r"```(sh|bash)\s*", lines[i]):
        start = i + 1
        j = start
        while j < len(lines) and not re.fullmatch(r"```\s*", lines[j]):
            j += 1
        if j == len(lines):
            sys.exit(f"{doc}:{i + 1}: code block is not closed")
        body = lines[start:j]
        m = re.fullmatch(r"#\s*recipe:\s*([A-Za-z0-9_-]+)\s*", body[0]) if body else None
        if m:
            name = m.group(1)
            if name in names:
                sys.exit(f"{doc}:{start + 1}: recipe name {name!r} used twice")
            names.add(name)
            expect = ""
            for line in body[1:]:
                if not line.startswith("#"):
                    break
                e = re.fullmatch(r"#\s*expect:\s*(\S+)\s*", line)
                if e:
                    expect = e.group(1)
                    if expect not in CODES:
                        sys.exit(f"{doc}: recipe {name}: unknown gRPC code {expect!r} in '# expect:'")
            recipes.append((name, expect, start + 1, "\n".join(body) + "\n"))
        i = j + 1
    else:
        i += 1
if not recipes:
    sys.exit(f"{doc}: no ```sh block starts with '# recipe: NAME'")
with open(os.path.join(outdir, "index.tsv"), "w", encoding="utf-8") as index:
    for n, (name, expect, line, body) in enumerate(recipes, 1):
        path = os.path.join(outdir, f"{n:02d}-{name}.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        index.write(f"{n:02d}\t{name}\t{expect or '-'}\t{line}\n")
PY

RECIPE_COUNT="$(wc -l <"${WORK}/recipes/index.tsv")"
echo "==> ${RECIPE_COUNT} recipes in ${DOC#"${ROOT}"/}"

# Every RPC has at least one recipe: those of the contract, and any the server adds.
mapfile -t served_rpcs < <(sed -n 's/^[[:space:]]*rpc \([A-Za-z0-9_]*\) (.*/\1/p' "${WORK}/out/smoke-describe.txt" 2>/dev/null || true)
mapfile -t all_rpcs < <(printf '%s\n' "${RPCS[@]}" "${served_rpcs[@]}" | sed '/^$/d' | sort -u)
missing_rpcs=()
for rpc in "${all_rpcs[@]}"; do
  grep -q "${SERVICE}/${rpc}\b" "${WORK}"/recipes/*.sh || missing_rpcs+=("${rpc}")
done
if [ "${#missing_rpcs[@]}" -eq 0 ]; then
  pass "every one of the ${#all_rpcs[@]} RPCs has a recipe"
else
  printf '%s\n' "RPCs without a recipe: ${missing_rpcs[*]}" >"${WORK}/out/coverage.txt"
  fail "every one of the ${#all_rpcs[@]} RPCs has a recipe" "${WORK}/out/coverage.txt"
fi

# --- run the recipes in document order ------------------------------------------------
# Things the story needs that an operator does outside grpcurl.
before_recipe() {
  case "$1" in
    Reconcile)
      # The license file arrives (Kubernetes: the license Secret is mounted/updated).
      cp "${WORK}/license.staged.json" "${LICENSE_FILE}"
      ;;
    Reconcile-concurrent)
      # The vendor's next document sells call_assist for concurrent use.
      cp "${WORK}/license.concurrent.json" "${LICENSE_FILE}"
      ;;
  esac
}

while IFS=$'\t' read -r seq name expect line; do
  file="${WORK}/recipes/${seq}-${name}.sh"
  out="${WORK}/out/${name}.txt"
  before_recipe "${name}"
  rc=0
  (cd "${WORK}/run" && ADDR="${ADDR}" TLS_ADDR="${TLS_ADDR}" METRICS_ADDR="${METRICS_ADDR}" TOKEN="${TOKEN}" CERTS="${CERTS}" \
    timeout 60 bash -euo pipefail "${file}") </dev/null >"${out}" 2>&1 || rc=$?
  where="(${DOC##*/}:${line})"
  if [ "${expect}" = "-" ]; then
    if [ "${rc}" -eq 0 ]; then
      pass "recipe ${name}"
    else
      fail "recipe ${name} ${where}: exit status ${rc}" "${out}"
      rm -f "${out}.ok"
      continue
    fi
  else
    if [ "${rc}" -ne 0 ] && grep -q "Code: ${expect}\$" "${out}"; then
      pass "recipe ${name} fails with ${expect} as documented"
    else
      fail "recipe ${name} ${where}: expected an error with code ${expect}, got exit status ${rc}" "${out}"
      continue
    fi
  fi
  touch "${out}.ok"
done <"${WORK}/recipes/index.tsv"

# --- check the JSON some recipes printed ----------------------------------------------
# json_check RECIPE DESCRIPTION PYTHON_EXPRESSION
# In the expression: d is the (last) JSON document the recipe printed, docs all of them,
# out(NAME) the last document of another recipe. Absent fields are defaults: use d.get().
json_check() {
  local recipe="$1" description="$2" expr="$3"
  local out="${WORK}/out/${recipe}.txt" why="${WORK}/out/${recipe}.why"
  if [ ! -e "${out}.ok" ]; then
    printf 'recipe %s is missing from %s or did not succeed\n' "${recipe}" "${DOC##*/}" >"${why}"
    fail "${recipe}: ${description}" "${why}"
    return
  fi
  if python3 - "${WORK}/out" "${recipe}" "${expr}" >"${why}" 2>&1 <<'PY'; then
import json
import os
import sys

outdir, recipe, expr = sys.argv[1], sys.argv[2], sys.argv[3]


def load(name):
    text = open(os.path.join(outdir, name + ".txt"), encoding="utf-8").read()
    decoder, docs, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return docs
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)


def out(name):
    return load(name)[-1]


docs = load(recipe)
d = docs[-1] if docs else {}
if not eval("(" + expr + "\n)", {"d": d, "docs": docs, "out": out}):
    print("not true: " + expr)
    print(json.dumps(docs if len(docs) > 1 else d, indent=2))
    sys.exit(1)
PY
    pass "${recipe}: ${description}"
  else
    fail "${recipe}: ${description}" "${why}"
  fi
}

json_check GetLicenseOverview "a fresh VM PBX: not initialized, tryout available" \
  'd["serialNumber"] == "'"${SERIAL}"'" and d["edition"] == "EDITION_VM"
   and d["activationState"] == "ACTIVATION_STATE_NOT_INITIALIZED"
   and d["tryout"]["state"] == "TRYOUT_STATE_AVAILABLE" and not d.get("entitlements")
   and d.get("lastReconcileError", "") != ""'
json_check GetTryoutStatus "tryout AVAILABLE with 3 test seats" \
  'd["status"]["state"] == "TRYOUT_STATE_AVAILABLE" and d["status"]["testSeatsTotal"] == 3'
json_check StartTryout "tryout ACTIVE with 14 days remaining" \
  'd["status"]["state"] == "TRYOUT_STATE_ACTIVE" and d["status"]["daysRemaining"] == 14
   and "endsAt" in d["status"]'
json_check AssignSeat "a new tryout seat for alice (created: true)" \
  'd.get("created") is True and d["seat"]["userId"] == "alice"
   and d["seat"]["feature"] == "user" and d["seat"]["source"] == "SEAT_SOURCE_TRYOUT"'
json_check AssignSeat-again "assigning again returns the same seat (created omitted = false)" \
  'd.get("created", False) is False and d["seat"] == out("AssignSeat")["seat"]'
json_check CheckSeat "after AssignSeat alice is licensed until the tryout ends" \
  'd.get("licensed") is True and d["source"] == "SEAT_SOURCE_TRYOUT"
   and d["reason"] == "SEAT_REASON_ASSIGNED" and not d.get("stale", False)
   and d["validUntil"] == out("StartTryout")["status"]["endsAt"]'
json_check AssignSeat "the assignment answers the version it is visible at" \
  'int(d["version"]) > 0'
json_check CheckSeat-min-version "a check with the assignment's version sees alice, at that version or later" \
  'd.get("licensed") is True and int(d["version"]) >= int(out("AssignSeat")["version"])'
json_check CheckSeat-unassigned "a user without a seat is not licensed (licensed omitted)" \
  'd.get("licensed", False) is False and d["reason"] == "SEAT_REASON_NOT_ASSIGNED"
   and "source" not in d'
json_check ListSeats "lists the tryout seats of alice and bob, in user id order" \
  '[(s["userId"], s["source"]) for s in d["seats"]]
   == [("alice", "SEAT_SOURCE_TRYOUT"), ("bob", "SEAT_SOURCE_TRYOUT")]
   and not d.get("nextPageToken")'
json_check ReleaseSeat "releasing bob's seat says released: true" 'd.get("released") is True'
json_check ReleaseSeat-again "releasing nothing is OK (released omitted = false)" \
  'd.get("released", False) is False'
json_check EndTryout "the tryout is ENDED and alice's test seat still counted" \
  'd["status"]["state"] == "TRYOUT_STATE_ENDED" and d["status"].get("testSeatsUsed") == 1
   and d["status"].get("daysRemaining", 0) == 0'
json_check CheckSeat-tryout-over "alice's test seat is no longer licensed: TRYOUT_OVER" \
  'd.get("licensed", False) is False and d["source"] == "SEAT_SOURCE_TRYOUT"
   and d["reason"] == "SEAT_REASON_TRYOUT_OVER"'
json_check Reconcile "the license file is applied (UPDATED, user=5, call_assist=1)" \
  'd["outcome"] == "RECONCILE_OUTCOME_UPDATED" and not d.get("error")
   and sorted((e["feature"], e["quantity"]) for e in d["entitlements"])
       == [("call_assist", 1), ("user", 5)]'
json_check Reconcile-again "reconciling the same license again is UNCHANGED" \
  'd["outcome"] == "RECONCILE_OUTCOME_UNCHANGED"'
json_check AssignSeat-purchased "alice's test seat is replaced by a purchased one" \
  'd.get("created") is True and d["seat"]["source"] == "SEAT_SOURCE_PURCHASED"'
json_check CheckSeat-purchased "alice is licensed with a purchased, open-ended seat" \
  'd.get("licensed") is True and d["source"] == "SEAT_SOURCE_PURCHASED"
   and d["reason"] == "SEAT_REASON_ASSIGNED" and "validUntil" not in d'
json_check AssignSeat-call-assist "alice gets the one call_assist seat" \
  'd.get("created") is True and d["seat"]["feature"] == "call_assist"
   and d["seat"]["source"] == "SEAT_SOURCE_PURCHASED"'
json_check ListSeats-all-pages "paging yields every seat once, ordered by feature then user" \
  'len(docs) == 2 and docs[0].get("nextPageToken") and not docs[-1].get("nextPageToken")
   and [(s["feature"], s["userId"]) for p in docs for s in p["seats"]]
       == [("call_assist", "alice"), ("user", "alice")]'
json_check GetLicenseOverview-licensed "active, with seats in use per entitlement and the tryout ended" \
  'd["activationState"] == "ACTIVATION_STATE_ACTIVE" and d.get("systemActivated") is True
   and sorted((e["feature"], e["quantity"], e.get("inUse", 0)) for e in d["entitlements"])
       == [("call_assist", 1, 1), ("user", 5, 1)]
   and d["tryout"]["state"] == "TRYOUT_STATE_ENDED"
   and d["lastReconcileOutcome"] == "RECONCILE_OUTCOME_UNCHANGED"
   and not d.get("lastReconcileError")'

json_check CreateInitializationCode "an initialization code in grouped base32" \
  'd["initializationCode"].startswith("CTX1-") and len(d["initializationCode"]) > 30'
json_check ResetActivation "reset: not initialized, no seats, no entitlements, tryout record kept" \
  'd["overview"]["activationState"] == "ACTIVATION_STATE_NOT_INITIALIZED"
   and not d["overview"].get("entitlements")
   and d["overview"]["tryout"]["state"] == "TRYOUT_STATE_ENDED"'
json_check CheckSeat-after-reset "after the reset alice holds no seat" \
  'd.get("licensed", False) is False and d["reason"] == "SEAT_REASON_NOT_ASSIGNED"'
json_check Reconcile-after-reset "the licenses come back, bound to the serial number" \
  'd["outcome"] in ("RECONCILE_OUTCOME_UPDATED", "RECONCILE_OUTCOME_UNCHANGED")
   and sorted((e["feature"], e["quantity"], e.get("inUse", 0)) for e in d["entitlements"])
       == [("call_assist", 1, 0), ("user", 5, 0)]'
json_check Reconcile-concurrent "call_assist is now sold for concurrent use, two at a time" \
  'd["outcome"] == "RECONCILE_OUTCOME_UPDATED"
   and sorted((e["feature"], e["quantity"], e.get("seatModel")) for e in d["entitlements"])
       == [("call_assist", 2, "SEAT_MODEL_CONCURRENT"), ("user", 5, "SEAT_MODEL_ASSIGNED")]'
json_check AcquireLease "alice's call takes a lease of call_assist" \
  'd.get("created") is True and d["lease"]["userId"] == "alice"
   and d["lease"]["holder"] == "call-handling-0" and int(d["version"]) > 0'
json_check AcquireLease-again "the same holder gets the same lease back, renewed" \
  'd.get("created", False) is False
   and d["lease"]["leaseId"] == out("AcquireLease")["lease"]["leaseId"]'
json_check CheckSeat-leased "alice is licensed while her lease lives" \
  'd.get("licensed") is True and "validUntil" in d'
json_check ListLeases "two live leases: alice and bob" \
  'sorted(l["userId"] for l in d["leases"]) == ["alice", "bob"]'
json_check RenewLeases "the held lease is renewed, the unknown id is lost" \
  'len(d["leases"]) == 1 and d["lost"] == ["00000000000000000000000000000000"]'
json_check ReleaseLease "the lease is given back" \
  'd.get("released") is True'
json_check CheckSeat-no-lease "without a live lease alice is not licensed for call_assist" \
  'd.get("licensed", False) is False and d["reason"] == "SEAT_REASON_NO_LEASE"'
json_check token-CheckSeat "a call_handling token may check seats" \
  '"reason" in d'
json_check mtls-GetLicenseOverview "the mTLS server runs with auth.mode enforce" \
  'd.get("authMode") == "enforce"'
json_check ListAuditEvents "the trail names the token caller's refused AssignSeat" \
  'any(e["method"] == "AssignSeat" and e["code"] == "PERMISSION_DENIED"
       and e["caller"] == "recipes-pbx" for e in d["events"])'

# --- summary --------------------------------------------------------------------------
if [ "${FAILED}" -gt 0 ]; then
  echo "server log (last lines):"
  tail -n 15 "${WORK}/server.log" | sed 's/^/      | /'
  echo "error: ${FAILED} check(s) failed; rerun with RECIPES_KEEP=1 to keep the outputs" >&2
fi
echo "${PASSED} passed, ${FAILED} failed"
[ "${FAILED}" -eq 0 ]

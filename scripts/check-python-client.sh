#!/usr/bin/env bash
# Runs the Python reference consumer (examples/python/watch_seats.py) against a live
# server and checks that its local decisions equal the server's CheckSeat answers.
#
#   scripts/check-python-client.sh
#
# What it does:
#   1. checks that the tools venv (.tools/venv, scripts/install-tools.sh) has the pinned
#      grpcio and grpcio-tools;
#   2. makes a development vendor key and a signed license (edition vm, user=3,
#      call_assist=1) in a temporary directory, and starts the server on a free loopback
#      port with the in-memory store, a heartbeat every 300 ms and the license file
#      configured but not there yet (a fresh PBX: the tryout first);
#   3. in Python (grpcio, stubs generated from proto/): checks that the consumer answers
#      UNKNOWN before its first snapshot, starts it, then walks through tryout start,
#      assigns, releases, tryout end, the license file applied by Reconcile, purchased
#      seats up to and beyond capacity, a broken stream resumed by version, a license
#      selling call_assist for concurrent use with leases taken, refused and released,
#      and idle heartbeats. After each step it waits until the consumer has reached the server's
#      version and compares the consumer's decision (licensed, reason) with the server's
#      CheckSeat for every user and both seat features.
#
# Prints one line per step (`ok` or `FAIL`) and `N passed, M failed`; exits non-zero on
# any difference.
#
# Environment (all optional):
#   PYCLIENT_BIN    the service binary (default target/debug/comtrexx-licensing)
#   PYCLIENT_PYTHON the Python with grpcio (default .tools/venv/bin/python)
#   PYCLIENT_KEEP=1 keep the temporary directory (server.log)
#   PYCLIENT_STARTUP_TIMEOUT seconds to wait for the server (default 60)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${PYCLIENT_BIN:-${ROOT}/target/debug/comtrexx-licensing}"
PY="${PYCLIENT_PYTHON:-${ROOT}/.tools/venv/bin/python}"
STARTUP_TIMEOUT="${PYCLIENT_STARTUP_TIMEOUT:-60}"
SERIAL="0123456789AB"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# The service reads every LICENSING_* variable as configuration: start from a clean slate.
while IFS= read -r var; do
  unset "${var}"
done < <(compgen -e | grep '^LICENSING_' || true)

[ -x "${BIN}" ] || die "service binary ${BIN} not found (cargo build --bin comtrexx-licensing, or set PYCLIENT_BIN)"
[ -x "${PY}" ] || die "${PY} not found: run scripts/install-tools.sh (or set PYCLIENT_PYTHON)"
"${PY}" -c 'import grpc, grpc_tools' 2>/dev/null \
  || die "grpcio/grpcio-tools missing in ${PY}: run scripts/install-tools.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/python-client.XXXXXX")"
SERVER_PID=""
cleanup() {
  local status=$?
  if [ -n "${SERVER_PID}" ] && kill -0 "${SERVER_PID}" 2>/dev/null; then
    kill -TERM "${SERVER_PID}" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "${SERVER_PID}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${SERVER_PID}" 2>/dev/null || true
    wait "${SERVER_PID}" 2>/dev/null || true
  fi
  if [ "${status}" -ne 0 ] && [ -f "${WORK}/server.log" ]; then
    echo "server log (last lines):"
    tail -n 15 "${WORK}/server.log" | sed 's/^/      | /'
  fi
  if [ "${PYCLIENT_KEEP:-}" = "1" ]; then
    echo "kept ${WORK}"
  else
    rm -rf "${WORK}"
  fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "${WORK}/license"
# shellcheck source=scripts/dev-licenses.sh
source "${ROOT}/scripts/dev-licenses.sh"
# A vendor key and two documents: 3 users and one call_assist seat, then the
# same with call_assist sold for concurrent use (two at a time), applied later.
dev_licenses "${BIN}" "${WORK}" "${SERIAL}" 3
LICENSE_FILE="${WORK}/license/license.json"

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADDR="127.0.0.1:${PORT}"
echo "==> starting ${BIN##*/} on ${ADDR} (in-memory store, serial ${SERIAL})"
# auth.mode protected (default): a caller on loopback without credentials is an operator.
env "LICENSING_LISTEN_ADDR=${ADDR}" "LICENSING_METRICS_ADDR=" \
  "LICENSING_SERIAL_NUMBER=${SERIAL}" "LICENSING_EDITION=vm" \
  "LICENSING_LICENSE_FILE=${LICENSE_FILE}" \
  "LICENSING_VENDOR_PUBLIC_KEY=$(cat "${WORK}/vendor.pub")" \
  "LICENSING_DRAIN_TIMEOUT_MS=1000" "LICENSING_WATCH__HEARTBEAT_MS=300" \
  "${BIN}" serve >"${WORK}/server.log" 2>&1 &
SERVER_PID=$!

"${PY}" - "${ROOT}" "${ADDR}" "${SERVER_PID}" "${LICENSE_FILE}" "${WORK}/license.staged.json" \
  "${STARTUP_TIMEOUT}" "${WORK}/license.concurrent.json" <<'PY'
import os
import shutil
import sys
import time

root, addr, server_pid, license_file, staged, startup_timeout, concurrent = sys.argv[1:8]
sys.path.insert(0, os.path.join(root, "examples", "python"))
import grpc  # noqa: E402
import watch_seats  # noqa: E402

pb, pb_grpc = watch_seats.load_stubs()
USERS = ["alice", "bob", "carol", "dave", "erin", "nobody"]
FEATURES = ["user", "call_assist"]

channel = grpc.insecure_channel(addr)
stub = pb_grpc.LicensingServiceStub(channel)

# Wait for the server: it answers once it has state (the start-up reconcile ran).
deadline = time.monotonic() + float(startup_timeout)
while True:
    try:
        overview = stub.GetLicenseOverview(pb.GetLicenseOverviewRequest(), timeout=2)
        if overview.last_reconcile_outcome:
            break
    except grpc.RpcError:
        pass
    try:
        os.kill(int(server_pid), 0)
    except OSError:
        sys.exit("error: the server exited during start-up")
    if time.monotonic() > deadline:
        sys.exit(f"error: the server did not answer within {startup_timeout} s")
    time.sleep(0.2)
print(f"==> server answers on {addr}")

passed = failed = 0
compared = 0


def result(ok, what, details=()):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok    {what}", flush=True)
    else:
        failed += 1
        print(f"FAIL  {what}", flush=True)
        for line in details:
            print(f"      | {line}")


consumer = watch_seats.WatchSeatsConsumer(addr, heartbeat_s=0.3)
before = [consumer.check_seat(u, f) for u in USERS for f in FEATURES]
result(all(d.licensed is None and d.reason == watch_seats.UNKNOWN for d in before),
       "before its first snapshot the consumer answers UNKNOWN, not 'not licensed'",
       [str(before[0])])
consumer.start()


# The version of the last write (every write's response carries it): the consumer's copy
# must reach it before it is compared.
written = {"version": 0}


def server_version():
    return written["version"]


def compare():
    global compared
    diffs = []
    for user in USERS:
        for feature in FEATURES:
            server = stub.CheckSeat(pb.CheckSeatRequest(user_id=user, feature=feature))
            local = consumer.check_seat(user, feature)
            want = (server.licensed, pb.SeatReason.Name(server.reason))
            got = (local.licensed, local.reason)
            compared += 1
            if got != want:
                diffs.append(f"{user}/{feature}: server {want}, consumer {got}")
    return diffs


def agree(step):
    """Compares every user's decision with CheckSeat once the consumer has caught up:
    waits for the last write's version where the store reports one (the in-memory
    store answers 0), and otherwise retries (bounded) while the stream is in flight;
    nothing changes on the server between the steps."""
    version = server_version()
    if not consumer.wait_for_version(version, timeout=10):
        result(False, f"{step}: consumer reaches version {version}",
               [f"consumer at {consumer.version}, snapshot={consumer.state is not None}"])
        return
    deadline = time.monotonic() + 10
    while True:
        diffs = compare()
        if not diffs or time.monotonic() > deadline:
            break
        with consumer.changed:
            consumer.changed.wait(0.1)
    result(not diffs, f"{step}: consumer agrees with CheckSeat for {len(USERS)} users x "
           f"{len(FEATURES)} features (copy at version {consumer.version})", diffs)


def call(what, fn, expect_error=None):
    try:
        response = fn()
        written["version"] = max(written["version"], response.version)
        if expect_error:
            result(False, f"{what}: expected {expect_error}")
    except grpc.RpcError as e:
        if e.code().name != expect_error:
            result(False, f"{what}: {e.code().name}: {e.details()}")


def assign(user, feature="user", expect_error=None):
    call(f"AssignSeat {user}/{feature}",
         lambda: stub.AssignSeat(pb.AssignSeatRequest(user_id=user, feature=feature)), expect_error)


def release(user, feature="user"):
    call(f"ReleaseSeat {user}/{feature}",
         lambda: stub.ReleaseSeat(pb.ReleaseSeatRequest(user_id=user, feature=feature)))


agree("fresh PBX, no tryout, no license")
call("StartTryout", lambda: stub.StartTryout(pb.StartTryoutRequest()))
agree("tryout started")
for user in ("alice", "bob", "carol"):
    assign(user)
agree("three tryout seats assigned")
assign("dave", expect_error="RESOURCE_EXHAUSTED")
release("bob")
assign("dave")
agree("bob released, dave assigned")

snapshots = consumer.snapshots
connects = consumer.connects
consumer.reconnect()
assign("bob", expect_error="RESOURCE_EXHAUSTED")
release("carol")
deadline = time.monotonic() + 10
while consumer.connects == connects and time.monotonic() < deadline:
    time.sleep(0.05)
agree("stream broken, changes made meanwhile, resumed")
result(consumer.connects > connects and consumer.snapshots == snapshots,
       "the broken stream resumed by version (no new snapshot)",
       [f"connects {connects} -> {consumer.connects}, snapshots {snapshots} -> {consumer.snapshots}"])

call("EndTryout", lambda: stub.EndTryout(pb.EndTryoutRequest()))
agree("tryout ended: test seats are TRYOUT_OVER")

shutil.copy(staged, license_file)
call("Reconcile", lambda: stub.Reconcile(pb.ReconcileRequest()))
agree("license applied (user=3, call_assist=1)")
for user in ("alice", "bob", "erin"):
    assign(user)
assign("alice", "call_assist")
agree("purchased seats assigned")
assign("carol", expect_error="RESOURCE_EXHAUSTED")
release("bob")
release("alice", "call_assist")
assign("carol")
assign("dave", "call_assist")
agree("purchased seats released and reassigned")

# Concurrent use: call_assist is now sold as leases (two at a time); dave's
# assigned call_assist seat licenses nothing any more.
shutil.copy(concurrent, license_file)
call("Reconcile", lambda: stub.Reconcile(pb.ReconcileRequest()))
agree("license with call_assist for concurrent use (2) applied")
leases = {}


def acquire(user, holder="pod-1", expect_error=None):
    def go():
        r = stub.AcquireLease(pb.AcquireLeaseRequest(user_id=user, feature="call_assist", holder=holder))
        leases[user] = r.lease.lease_id
        return r
    call(f"AcquireLease {user}/call_assist", go, expect_error)


acquire("alice")
acquire("bob", "pod-2")
acquire("alice")
agree("two leases of call_assist held")
acquire("carol", expect_error="RESOURCE_EXHAUSTED")
call("ReleaseLease alice",
     lambda: stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=leases["alice"])))
acquire("carol")
agree("a lease released and taken by another user")

beats = consumer.heartbeats
time.sleep(1.5)
result(consumer.heartbeats > beats and not consumer.check_seat("alice").stale,
       "idle stream: heartbeats arrive and the copy is not stale",
       [f"heartbeats {beats} -> {consumer.heartbeats}"])
agree("after idle heartbeats (time from the reference clock)")

consumer.stop()
print(f"consumer: {consumer.snapshots} snapshot(s), {consumer.changes} changes, "
      f"{consumer.heartbeats} heartbeats, {consumer.connects} connects; "
      f"{compared} decisions compared with CheckSeat")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY

#!/usr/bin/env bash
# Builds the Debian package from the release binary and checks it the way a VM
# operator uses it (see docs/deploy.md, "Single VM"):
#
#   1. cargo deb --no-build: packages target/release/comtrexx-licensing and
#      target/release/licensing-agent as built by `cargo build --release -p
#      comtrexx-licensing -p comtrexx-licensing-client --bins` (run that first;
#      this script does not build);
#   2. lintian: no errors;
#   3. the packaged units (service and agent): `systemd-analyze verify` clean, and
#      the offline security rating 2.0 or lower ("OK" or better);
#   4. dpkg -i; the installed binary validates the packaged configuration;
#   5. the installed binary started as the unit starts it (its ExecStart, as its
#      User, without privileges), with the packaged configuration, against a
#      private redis-server on a free port: health says SERVING over gRPC, a
#      StartTryout lands in that Redis, licensing-agent (its unit's settings,
#      pointed at it) answers CheckSeat on its Unix socket, SIGHUP reloads
#      without stopping it, SIGTERM stops it cleanly;
#   6. upgrading to a later revision keeps a changed configuration (a conffile);
#   7. dpkg --purge removes it.
#
# Needs root (dpkg), redis-server, lintian, systemd-analyze, cargo-deb and grpcurl
# (scripts/install-tools.sh installs them). No systemd as PID 1 is needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
# shellcheck source=scripts/tools-env.sh
source scripts/tools-env.sh

PKG=comtrexx-licensing
UNIT=/usr/lib/systemd/system/${PKG}.service
CONF=/etc/${PKG}/config.toml
# The highest acceptable `systemd-analyze security` exposure (0.0 to 10.0).
MAX_EXPOSURE=2.0

log() { printf '==> %s\n' "$*"; }
die() { printf 'check-deb: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (dpkg -i)"
for tool in cargo-deb lintian systemd-analyze redis-server redis-cli grpcurl setpriv python3; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} not on PATH (run scripts/install-tools.sh)"
done
[ -x target/release/${PKG} ] || die "target/release/${PKG} missing: run cargo build --release first"
[ -x target/release/licensing-agent ] \
  || die "target/release/licensing-agent missing: run cargo build --release -p comtrexx-licensing-client first"

work="$(mktemp -d)"
redis_pid=""
service_pid=""
agent_pid=""
cleanup() {
  [ -n "${agent_pid}" ] && kill "${agent_pid}" 2>/dev/null || true
  [ -n "${service_pid}" ] && kill "${service_pid}" 2>/dev/null || true
  [ -n "${redis_pid}" ] && kill "${redis_pid}" 2>/dev/null || true
  if dpkg-query -W -f='${Status}' "${PKG}" 2>/dev/null | grep -q installed; then
    dpkg --purge "${PKG}" >/dev/null 2>&1 || true
  fi
  rm -rf "${work}"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- 1. build ------------------------------------------------------------------------
log "cargo deb --no-build"
deb="$(cargo deb --package comtrexx-licensing --no-build --locked --output "${work}/" 2>"${work}/cargo-deb.log" | tail -n 1)" \
  || { cat "${work}/cargo-deb.log" >&2; die "cargo deb failed"; }
[ -f "${deb}" ] || { cat "${work}/cargo-deb.log" >&2; die "cargo deb made no package (${deb})"; }
log "built ${deb}"
dpkg-deb --info "${deb}" | sed -n '/Package:/,$p'
if dpkg-deb --contents "${deb}" | grep -q 'licensing-sim'; then
  die "the package must not contain the development licensing server"
fi

# --- 2. lintian ------------------------------------------------------------------------
log "lintian"
lintian --allow-root --fail-on error --show-overrides "${deb}" || die "lintian reports errors"

# --- 3. the unit, as packaged ---------------------------------------------------------
mkdir -p "${work}/extract"
dpkg-deb --extract "${deb}" "${work}/extract"
packaged_unit="${work}/extract${UNIT}"
[ -f "${packaged_unit}" ] || die "no ${UNIT} in the package"
for unit in "${PKG}" "${PKG}-agent"; do
  log "systemd-analyze security --offline=true ${unit} (must be <= ${MAX_EXPOSURE})"
  [ -f "${work}/extract/usr/lib/systemd/system/${unit}.service" ] || die "no ${unit}.service in the package"
  # The unit's own name, so that the report is about it and not a copy.
  cp "${work}/extract/usr/lib/systemd/system/${unit}.service" "${work}/${unit}.service"
  security="$(systemd-analyze security --offline=true --no-pager "${work}/${unit}.service" 2>&1)" \
    || { printf '%s\n' "${security}" >&2; die "systemd-analyze security failed"; }
  printf '%s\n' "${security}" | grep -E '✗|Overall'
  exposure="$(printf '%s\n' "${security}" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
  [ -n "${exposure}" ] || die "no overall exposure level in the report"
  awk -v e="${exposure}" -v max="${MAX_EXPOSURE}" 'BEGIN { exit !(e <= max) }' \
    || die "${unit}: security exposure ${exposure} is above ${MAX_EXPOSURE}"
done

# --- 4. install -------------------------------------------------------------------------
log "dpkg -i"
dpkg -i "${deb}"
id "${PKG}" >/dev/null || die "the package did not create the user ${PKG}"
[ "$(stat -c '%U:%G %a' "${CONF}")" = "root:${PKG} 640" ] \
  || die "${CONF} should be root:${PKG} 0640, is $(stat -c '%U:%G %a' "${CONF}")"
AGENT_UNIT=/usr/lib/systemd/system/${PKG}-agent.service
for unit in "${UNIT}" "${AGENT_UNIT}"; do
  log "systemd-analyze verify ${unit}"
  verify="$(systemd-analyze verify "${unit}" 2>&1)" || { printf '%s\n' "${verify}" >&2; die "verify failed"; }
  if printf '%s\n' "${verify}" | grep -F "${PKG}"; then
    die "systemd-analyze verify reports problems with ${unit}"
  fi
done
[ -f "/etc/${PKG}/agent.env" ] || die "no /etc/${PKG}/agent.env"
/usr/bin/licensing-agent --version >/dev/null || die "licensing-agent does not run"

log "the packaged configuration is valid"
effective="$(/usr/bin/${PKG} --config "${CONF}" config)"
# The VM's own services call it locally: the packaged service listens on loopback only.
grep -qx 'listen_addr = "127.0.0.1:50051"' <<<"${effective}" \
  || die "the packaged configuration should listen on 127.0.0.1:50051"

# --- 5. run as the unit would ----------------------------------------------------------
redis_port="$(free_port)"
redis-server --port "${redis_port}" --bind 127.0.0.1 --save '' --appendonly no \
  >"${work}/redis.log" 2>&1 &
redis_pid=$!
grpc_port="$(free_port)"
metrics_port="$(free_port)"
exec_start="$(sed -n 's/^ExecStart=//p' "${UNIT}")"
user="$(sed -n 's/^User=//p' "${UNIT}")"
[ -n "${exec_start}" ] && [ "${user}" = "${PKG}" ] || die "unit has no ExecStart or User=${PKG}"
# What systemd does before ExecStart: the unit's StateDirectory= (state_dir of the
# packaged configuration), owned by the service's user, with the unit's mode.
state_name="$(sed -n 's/^StateDirectory=//p' "${UNIT}")"
state_mode="$(sed -n 's/^StateDirectoryMode=//p' "${UNIT}")"
[ -n "${state_name}" ] || die "unit has no StateDirectory="
grep -qx "state_dir = \"/var/lib/${state_name}\"" <<<"${effective}" \
  || die "the packaged configuration should keep its state in /var/lib/${state_name}"
install -d -o "${user}" -g "${user}" -m "${state_mode:-0755}" "/var/lib/${state_name}"
log "starting '${exec_start}' as ${user} (redis on ${redis_port}, gRPC on ${grpc_port})"
# Like the unit: its user and group, no new privileges, no capabilities. Only the
# addresses differ (free ports), through the environment, which overrides the file.
# shellcheck disable=SC2086 # ExecStart is a command line
env -i PATH=/usr/bin:/bin \
  LICENSING_REDIS_URL="redis://127.0.0.1:${redis_port}/0" \
  LICENSING_LISTEN_ADDR="127.0.0.1:${grpc_port}" \
  LICENSING_METRICS_ADDR="127.0.0.1:${metrics_port}" \
  setpriv --reuid="${user}" --regid="${user}" --init-groups --no-new-privs \
  --inh-caps=-all --bounding-set=-all \
  ${exec_start} >"${work}/service.log" 2>&1 &
service_pid=$!

serving() {
  grpcurl -plaintext -max-time 2 "127.0.0.1:${grpc_port}" grpc.health.v1.Health/Check 2>/dev/null \
    | grep -q '"SERVING"'
}
for _ in $(seq 1 100); do
  serving && break
  kill -0 "${service_pid}" 2>/dev/null || { cat "${work}/service.log" >&2; die "the service exited"; }
  sleep 0.2
done
serving || { cat "${work}/service.log" >&2; die "health is not SERVING after 20 s"; }
log "health: SERVING"
# A write lands in the private Redis: the packaged configuration's store is used.
# (Writes wait for the first sync with a new, empty Redis: retry for a few seconds.)
for _ in $(seq 1 50); do
  grpcurl -plaintext "127.0.0.1:${grpc_port}" comtrexx.licensing.v1.LicensingService/StartTryout \
    >"${work}/tryout.json" 2>&1 && break
  sleep 0.2
done
cat "${work}/tryout.json"
redis-cli -p "${redis_port}" --scan --pattern 'lic:*:tryout' | grep -q . \
  || { cat "${work}/service.log" >&2; die "StartTryout wrote nothing to the private Redis"; }
grpcurl -plaintext "127.0.0.1:${grpc_port}" comtrexx.licensing.v1.LicensingService/GetLicenseOverview

# licensing-agent as its unit runs it (the packaged agent.env), pointed at this
# service and at a socket and cache file in the work directory.
log "licensing-agent answers CheckSeat on its Unix socket"
(
  set -a
  # shellcheck disable=SC1090
  . "/etc/${PKG}/agent.env"
  set +a
  LICENSING_AGENT_ENDPOINTS="http://127.0.0.1:${grpc_port}" \
  LICENSING_AGENT_LISTEN="unix:${work}/agent.sock" \
  LICENSING_AGENT_CACHE_FILE="${work}/agent-seats.cache" \
    exec /usr/bin/licensing-agent
) >"${work}/agent.log" 2>&1 &
agent_pid=$!
answer=""
for _ in $(seq 1 50); do
  answer="$(grpcurl -plaintext -unix -authority localhost -d '{"user_id": "alice"}' "${work}/agent.sock" \
    comtrexx.licensing.v1.LicensingService/CheckSeat 2>&1)" && break
  sleep 0.2
done
printf '%s\n' "${answer}"
grep -q '"reason": "SEAT_REASON_NOT_ASSIGNED"' <<<"${answer}" \
  || { cat "${work}/agent.log" >&2; die "licensing-agent did not answer CheckSeat"; }
kill -TERM "${agent_pid}"
wait "${agent_pid}" || die "licensing-agent did not exit cleanly on SIGTERM"
agent_pid=""

kill -HUP "${service_pid}"
for _ in $(seq 1 50); do
  grep -q "SIGHUP received" "${work}/service.log" && break
  sleep 0.1
done
grep -q "SIGHUP received" "${work}/service.log" || die "SIGHUP was not handled"
serving || { cat "${work}/service.log" >&2; die "not serving after SIGHUP"; }
log "SIGHUP: reloaded, still SERVING"

kill -TERM "${service_pid}"
status=0
wait "${service_pid}" || status=$?
service_pid=""
[ "${status}" -eq 0 ] || { cat "${work}/service.log" >&2; die "exit status ${status} after SIGTERM"; }
log "SIGTERM: drained and exited 0"

# --- 6. an upgrade keeps the operator's configuration ----------------------------------
log "upgrade to revision 2 keeps a changed configuration"
mkdir -p "${work}/upgrade"
upgrade="$(cargo deb --package comtrexx-licensing --no-build --locked --fast --deb-revision 2 --output "${work}/upgrade/" \
  2>"${work}/cargo-deb-upgrade.log" | tail -n 1)" \
  || { cat "${work}/cargo-deb-upgrade.log" >&2; die "cargo deb (revision 2) failed"; }
sed -i 's/^edition = "vm"$/edition = "business"/' "${CONF}"
dpkg -i "${upgrade}" >/dev/null
[ "$(dpkg-query -W -f='${Version}' "${PKG}")" = "$(dpkg-deb -f "${upgrade}" Version)" ] \
  || die "the upgrade did not install"
grep -q '^edition = "business"$' "${CONF}" || die "the upgrade replaced the changed ${CONF}"
[ "$(stat -c '%U:%G %a' "${CONF}")" = "root:${PKG} 640" ] || die "the upgrade reset ${CONF}'s mode"

# --- 7. purge ---------------------------------------------------------------------------
log "dpkg --purge"
dpkg --purge "${PKG}"
[ ! -e /usr/bin/${PKG} ] || die "/usr/bin/${PKG} left after purge"
[ ! -e /usr/bin/licensing-agent ] || die "/usr/bin/licensing-agent left after purge"
[ ! -e "${CONF}" ] || die "${CONF} left after purge"
[ ! -e "${UNIT}" ] || die "${UNIT} left after purge"
[ ! -e "/var/lib/${state_name}" ] || die "/var/lib/${state_name} left after purge"
log "package checks passed"

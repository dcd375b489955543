#!/usr/bin/env python3
"""Runs the console examples of README.md and compares their output with the README.

    scripts/readme-console.py            # builds nothing: uses target/debug binaries
    README_KEEP=1 scripts/readme-console.py

Every ```console block of README.md must be preceded by a marker line:

    <!-- console: SCENARIO -->      run in SCENARIO (below), in document order
    <!-- console: not run -->       shown only (say why in the text)

Scenarios (each on its own servers, free loopback ports, the embedded store):

    file-demo   "A local demo with a signed license file": serial DEMO-0001, a
                development key and a license for user=10, call_assist=2
    tryout      the same PBX without a license
    sim-demo    "A local demo with the development licensing server": licensing-sim
                with device 0123456789AB (vm, user=10, call_assist=2)

In a block, a line `$ COMMAND` (continued by lines after a trailing backslash) is run
with bash; `localhost:50051` is the scenario's server, $SIM the licensing-sim binary,
`kill %1` stops licensing-sim, and an initialization code written `CTX1-...` stands for
the last code a command printed. The lines up to the next `$ ` are its expected output:

    - none: the command must succeed;
    - starting with `ERROR:`: the command must fail, and its lines match line by line;
    - starting with `{`: JSON, compared as data (grpcurl's layout does not matter), with
      these wildcards: a timestamp matches any timestamp, an initialization code any
      code, a `version` any version, a string ending in `...` any string it begins, and
      an object ending in `, ... }` may have more keys; otherwise keys and values are
      the same;
    - otherwise the lines are the same.

Each command prints `ok` or `FAIL`; the exit status is 0 only when none failed and every
console block has a marker. Needs grpcurl (scripts/install-tools.sh) and python3.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.environ.get("README_DOC", os.path.join(ROOT, "README.md"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.environ.get("README_BIN", os.path.join(TARGET, "debug", "comtrexx-licensing"))
SIM = os.environ.get("README_SIM", os.path.join(TARGET, "debug", "licensing-sim"))
SERVICE = "comtrexx.licensing.v1.LicensingService"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
TIME_IN_TEXT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")

failed = 0
passed = 0


def report(ok, what, details=""):
    global failed, passed
    if ok:
        passed += 1
        print(f"ok    {what}")
    else:
        failed += 1
        print(f"FAIL  {what}")
        for line in details.splitlines()[:30]:
            print(f"      | {line}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the README's console blocks ------------------------------------------------------

def blocks(text):
    """(scenario, first line number, lines) of every console block; scenario None: unmarked."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            marker = None
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = re.fullmatch(r"<!--\s*console:\s*(.+?)\s*-->", lines[j].strip()) if j >= 0 else None
            if m:
                marker = m.group(1)
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            found.append((marker, i + 1, lines[i + 1:end]))
            i = end
        i += 1
    return found


def commands(lines):
    """(command, expected output lines) of a block."""
    result = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            i += 1
            continue
        command = line[2:]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip() + "\n" + lines[i]
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        while expected and not expected[-1].strip():
            expected.pop()
        result.append((command, expected))
    return result


# --- comparison -------------------------------------------------------------------------

def pattern(text):
    """The expected JSON, with `, ... }` turned into a marker key."""
    text = re.sub(r",\s*\.\.\.\s*}", ', "\u2026": true }', text)
    return json.loads(text)


def match(want, got, path="$"):
    """None when `got` matches `want`, else why not."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{path}: expected an object, got {got!r}"
        open_ended = want.pop("\u2026", False)
        for key, value in want.items():
            if key not in got:
                return f"{path}: missing {key!r}"
            why = match(value, got[key], f"{path}.{key}")
            if why:
                return why
        extra = sorted(set(got) - set(want))
        if extra and not open_ended:
            return f"{path}: not in the README: {extra}"
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{path}: expected {len(want)} elements, got {got!r}"
        for n, (w, g) in enumerate(zip(want, got)):
            why = match(w, g, f"{path}[{n}]")
            if why:
                return why
        return None
    if isinstance(want, str) and isinstance(got, str):
        if TIMESTAMP.match(want) and TIMESTAMP.match(got):
            return None
        # A version depends on how many writes the start-up made (a reconcile
        # recorded or not yet): any version matches any version.
        if path.endswith(".version") and want.isdigit() and got.isdigit():
            return None
        if want.startswith("CTX1-") and got.startswith("CTX1-"):
            return None
        if want.endswith("...") and got.startswith(want[:-3].rstrip()):
            return None
        # Times inside a text (e.g. activationReason) match any time.
        if TIME_IN_TEXT.sub("<time>", want) == TIME_IN_TEXT.sub("<time>", got):
            return None
    if want == got:
        return None
    return f"{path}: README {want!r}, got {got!r}"


def compare(expected, rc, output):
    """None when the output matches the expected lines, else why not."""
    if not expected:
        return None if rc == 0 else f"exit status {rc}"
    text = "\n".join(expected)
    if expected[0].startswith("ERROR:"):
        if rc == 0:
            return "the README shows an error, the command succeeded"
        got = [l.strip() for l in output.strip().splitlines()]
        want = [l.strip() for l in expected]
        if len(got) != len(want):
            return f"{len(want)} lines in the README, {len(got)} printed"
        for w, g in zip(want, got):
            if w != g and not (w.endswith("...") and g.startswith(w[:-3])):
                return f"README {w!r}\n   got {g!r}"
        return None
    if rc != 0:
        return f"exit status {rc}"
    if expected[0].lstrip().startswith("{"):
        try:
            want = pattern(text)
        except ValueError as e:
            return f"the README's JSON does not parse: {e}"
        try:
            got = json.loads(output)
        except ValueError as e:
            return f"the output is not one JSON document: {e}"
        return match(want, got)
    got = [l.rstrip() for l in output.strip().splitlines()]
    want = [l.rstrip() for l in expected]
    return None if got == want else "lines differ"


# --- scenarios ----------------------------------------------------------------------------

# Every scenario started, so that a failed start stops its processes too.
STARTED = []


class Scenario:
    def __init__(self, work, name):
        STARTED.append(self)
        self.work = os.path.join(work, name)
        os.makedirs(self.work)
        self.procs = []
        self.sim = None
        self.sim_addr = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LICENSING_")}
        self.env["SIM"] = SIM
        self.last_code = None

    def start(self, env, log):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LICENSING_")}, **env}
        proc = subprocess.Popen([BIN], env=env, cwd=self.work,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_for(self, addr, proc, log, reconciled):
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"the server exited:\n{open(log).read()[-3000:]}")
            r = subprocess.run(["grpcurl", "-plaintext", "-max-time", "2", addr, "list"],
                               capture_output=True)
            if r.returncode == 0 and not reconciled:
                return
            if r.returncode == 0:
                # The start-up reconcile, which the README's outputs come after.
                r = subprocess.run(["grpcurl", "-plaintext", addr, f"{SERVICE}/GetLicenseOverview"],
                                   capture_output=True, text=True)
                if r.returncode == 0 and json.loads(r.stdout).get("lastReconcileOutcome"):
                    return
            time.sleep(0.2)
        sys.exit(f"the server did not answer within 60 s:\n{open(log).read()[-3000:]}")

    def serve(self, env, reconciled=True):
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        log = os.path.join(self.work, "server.log")
        env = {"LICENSING_LISTEN_ADDR": self.addr, "LICENSING_METRICS_ADDR": "",
               "LICENSING_DRAIN_TIMEOUT_MS": "0", **env}
        proc = self.start(env, log)
        self.wait_for(self.addr, proc, log, reconciled)

    def run(self, command):
        command = command.replace("localhost:50051", self.addr)
        if command.split("#")[0].strip() == "kill %1":
            self.sim.terminate()
            self.sim.wait(timeout=10)
            return 0, ""
        if self.last_code:
            command = re.sub(r"CTX1-[A-Z0-9-]*\.\.\.", self.last_code, command)
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=self.work, env=self.env,
                           capture_output=True, text=True, timeout=60)
        output = (r.stdout + r.stderr).replace(self.work, "/tmp")
        if self.sim_addr:
            # The README's licensing-sim listens on its default address.
            output = output.replace(self.sim_addr, "127.0.0.1:7443")
        m = re.search(r'"initializationCode":\s*"([^"]+)"', output)
        if m:
            self.last_code = m.group(1)
        return r.returncode, output

    def stop(self):
        for proc in self.procs + ([self.sim] if self.sim else []):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def dev(work, *args):
    return subprocess.run([BIN, "dev", *args], cwd=work, check=True, capture_output=True,
                          text=True).stdout.strip()


def file_demo(work, with_license):
    s = Scenario(work, "file-demo" if with_license else "tryout")
    pub = dev(s.work, "keygen", "--out", "vendor.key")
    env = {"LICENSING_SERIAL_NUMBER": "DEMO-0001", "LICENSING_VENDOR_PUBLIC_KEY": pub}
    if with_license:
        # The README's path is /tmp/license.json: the work directory is shown as /tmp.
        license_file = os.path.join(s.work, "license.json")
        dev(s.work, "sign-license", "--key", "vendor.key", "--serial", "DEMO-0001",
            "--entitlement", "user=10", "--entitlement", "call_assist=2", "--out", license_file)
        env["LICENSING_LICENSE_FILE"] = license_file
    # Without a license source there is no start-up reconcile to wait for.
    s.serve(env, reconciled=with_license)
    return s


def sim_demo(work):
    s = Scenario(work, "sim-demo")
    state = os.path.join(s.work, "sim")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    s.sim_addr = f"127.0.0.1:{port}"
    s.env["LICENSING_SIM_URL"] = url
    log = open(os.path.join(s.work, "sim.log"), "w")
    s.sim = subprocess.Popen([SIM, "serve", "--state", state, "--listen", f"127.0.0.1:{port}"],
                             stdout=log, stderr=subprocess.STDOUT, env=s.env)
    deadline = time.time() + 30
    while "listening on" not in open(os.path.join(s.work, "sim.log")).read():
        if time.time() > deadline or s.sim.poll() is not None:
            sys.exit("licensing-sim did not start: " + open(os.path.join(s.work, "sim.log")).read())
        time.sleep(0.1)
    pub = subprocess.run([SIM, "public-key", "--state", state], check=True, capture_output=True,
                         text=True).stdout.strip()
    admin = [SIM, "admin"]
    for args in (["register-device", "--serial", "0123456789AB", "--name", "Office Berlin",
                  "--edition", "vm"],
                 ["redeem-voucher", "--serial", "0123456789AB", "--feature", "user",
                  "--quantity", "10"],
                 ["redeem-voucher", "--serial", "0123456789AB", "--feature", "call_assist",
                  "--quantity", "2"]):
        subprocess.run(admin + args, check=True, capture_output=True, env=s.env)
    s.serve({"LICENSING_SERIAL_NUMBER": "0123456789AB", "LICENSING_VENDOR_PUBLIC_KEY": pub,
             "LICENSING_LICENSING_SERVER__URL": url, "LICENSING_DEVELOPMENT_INSTALLATION": "true"},
            reconciled=False)
    return s


SCENARIOS = {
    "file-demo": lambda work: file_demo(work, True),
    "tryout": lambda work: file_demo(work, False),
    "sim-demo": sim_demo,
}


def main():
    for tool, hint in (("grpcurl", "run scripts/install-tools.sh, then 'source scripts/tools-env.sh'"),):
        if not shutil.which(tool):
            sys.exit(f"error: {tool} is not on PATH: {hint}")
    for binary in (BIN, SIM):
        if not os.access(binary, os.X_OK):
            sys.exit(f"error: {binary} not found: run `cargo build` first")
    found = blocks(open(README, encoding="utf-8").read())
    for marker, line, _ in found:
        if marker is None:
            report(False, f"README.md:{line}: console block without a `<!-- console: ... -->` marker")
        elif marker != "not run" and marker not in SCENARIOS:
            report(False, f"README.md:{line}: unknown scenario {marker!r}")
    work = tempfile.mkdtemp(prefix="readme-console.")
    running = {}
    try:
        for marker, line, lines in found:
            if marker not in SCENARIOS:
                continue
            if marker not in running:
                print(f"==> scenario {marker}")
                running[marker] = SCENARIOS[marker](work)
            scenario = running[marker]
            for command, expected in commands(lines):
                rc, output = scenario.run(command)
                why = compare(expected, rc, output)
                first = command.splitlines()[0]
                report(why is None, f"README.md:{line}: {first[:110]}",
                       f"{why}\n--- printed:\n{output}" if why else "")
    finally:
        for scenario in STARTED:
            scenario.stop()
        if os.environ.get("README_KEEP") == "1":
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

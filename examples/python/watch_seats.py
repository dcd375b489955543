#!/usr/bin/env python3
"""A reference WatchSeats consumer: a local copy of the seat state that decides
CheckSeat like the service does.

The protocol it follows is docs/clients.md. In short: it opens WatchSeats with
since_version 0, applies the snapshot, then every change in version order, and
takes the reference time from snapshots and heartbeats. When the stream breaks
it reconnects (to the same or another replica) with since_version = the last
version it applied, and gets the missing changes or a new snapshot. Before the
first snapshot every answer is UNKNOWN, never "not licensed".

Needs grpcio and grpcio-tools (pinned in scripts/install-tools.sh, which puts
them into .tools/venv). The Python stubs are generated at start from the
repository's proto into a temporary directory.

    .tools/venv/bin/python examples/python/watch_seats.py 127.0.0.1:50051 alice bob

follows the stream and prints the decision for user alice and bob (feature
"user") after every message. As a module:

    consumer = WatchSeatsConsumer("127.0.0.1:50051")
    consumer.start()                     # a background thread follows the stream
    consumer.check_seat("alice", "user") # Decision(licensed=..., reason=...)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTO_FILE = "comtrexx/licensing/v1/licensing.proto"

_stubs = None


def load_stubs(proto_root: str = PROTO_ROOT):
    """Generates licensing_pb2 and licensing_pb2_grpc into a temporary directory
    (once per process) and returns (pb2, pb2_grpc)."""
    global _stubs
    if _stubs is not None:
        return _stubs
    from grpc_tools import protoc  # grpcio-tools

    import grpc_tools

    out = tempfile.mkdtemp(prefix="licensing-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_root, PROTO_FILE),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) on {PROTO_FILE}")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("comtrexx.licensing.v1.licensing_pb2")
    pb2_grpc = importlib.import_module("comtrexx.licensing.v1.licensing_pb2_grpc")
    _stubs = (pb2, pb2_grpc)
    return _stubs


# --- the decision (crates/domain/src/decision.rs, seats.rs, activation.rs, tryout.rs) ---

NS = 1_000_000_000

# Reasons as the API names them (SeatReason), plus UNKNOWN: no snapshot yet.
ASSIGNED = "SEAT_REASON_ASSIGNED"
NOT_ASSIGNED = "SEAT_REASON_NOT_ASSIGNED"
TRYOUT_OVER = "SEAT_REASON_TRYOUT_OVER"
NOT_ACTIVATED = "SEAT_REASON_NOT_ACTIVATED"
OVER_CAPACITY = "SEAT_REASON_OVER_CAPACITY"
LICENSE_LAPSED = "SEAT_REASON_LICENSE_LAPSED"
NO_LEASE = "SEAT_REASON_NO_LEASE"
UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Decision:
    """A local CheckSeat answer. `licensed` is None when the answer is unknown
    (no snapshot yet): the caller applies its own fallback, it is not a "no"."""

    licensed: Optional[bool]
    reason: str
    source: Optional[str] = None  # "SEAT_SOURCE_PURCHASED" / "SEAT_SOURCE_TRYOUT"
    stale: bool = False


def _ts(msg, field: str) -> Optional[int]:
    """A google.protobuf.Timestamp field as nanoseconds since the epoch; None if unset."""
    if not msg.HasField(field):
        return None
    t = getattr(msg, field)
    return t.seconds * NS + t.nanos


class SeatState:
    """What the decision reads, taken from the stream only."""

    def __init__(self, pb2, snapshot):
        self.pb = pb2
        r = snapshot.rules
        self.edition = r.edition or pb2.EDITION_VM
        self.over_capacity_grace = r.over_capacity_grace_seconds * NS
        self.grace = r.grace_seconds * NS
        self.has_license_source = r.has_license_source
        self.serial_number = snapshot.serial_number
        self.epoch = snapshot.epoch
        self.seats = {}
        for w in snapshot.seats:
            self.put_seat(w)
        # Leases of concurrent-use features: id -> (feature, user, holder, expires_at ns).
        self.leases = {}
        for lease in snapshot.leases:
            self.put_lease(lease)
        self.license = self.read_license(snapshot.license) if snapshot.HasField("license") else None
        self.tryout = self.read_tryout(snapshot.tryout) if snapshot.HasField("tryout") else None
        self.reconcile = self.read_reconcile(snapshot.reconcile)

    # -- reading the messages --
    def put_seat(self, w):
        self.seats[(w.feature, w.user_id)] = {
            "source": w.source,
            "assigned_at": _ts(w, "assigned_at"),
            "over_capacity_since": _ts(w, "over_capacity_since"),
        }

    def put_lease(self, lease):
        # One lease per (feature, user, holder): another id of the same key goes.
        key = (lease.feature, lease.user_id, lease.holder)
        for other in [i for i, v in self.leases.items() if v[:3] == key]:
            del self.leases[other]
        self.leases[lease.lease_id] = key + (_ts(lease, "expires_at"),)

    def read_license(self, doc):
        concurrent = self.pb.SEAT_MODEL_CONCURRENT
        return {
            "applied_at": _ts(doc, "applied_at"),
            "entitlements": {
                e.feature: (e.quantity, _ts(e, "expires_at")) for e in doc.entitlements
            },
            # Unspecified (an older server) means assigned.
            "concurrent": {e.feature for e in doc.entitlements if e.seat_model == concurrent},
        }

    @staticmethod
    def read_tryout(t):
        return {
            "started_at": _ts(t, "started_at"),
            "ends_at": _ts(t, "ends_at"),
            "ended_at": _ts(t, "ended_at"),
            "forfeited_at": _ts(t, "forfeited_at"),
        }

    def read_reconcile(self, r):
        outcome = r.last_outcome
        return {
            "last_success_at": _ts(r, "last_success_at"),
            "last_attempt_at": _ts(r, "last_attempt_at"),
            "failing_outcome": outcome
            in (self.pb.RECONCILE_OUTCOME_UNREACHABLE, self.pb.RECONCILE_OUTCOME_REJECTED),
        }

    def apply_change(self, change):
        kind = change.WhichOneof("kind")
        if kind == "seat_put":
            self.put_seat(change.seat_put)
        elif kind == "seat_removed":
            self.seats.pop((change.seat_removed.feature, change.seat_removed.user_id), None)
        elif kind == "license_applied":
            self.license = self.read_license(change.license_applied)
        elif kind == "license_removed":
            self.license = None
        elif kind == "tryout_changed":
            self.tryout = self.read_tryout(change.tryout_changed)
        elif kind == "reconcile_recorded":
            self.reconcile = self.read_reconcile(change.reconcile_recorded)
        elif kind == "lease_put":
            for lease_id in change.lease_put.reclaimed:
                self.leases.pop(lease_id, None)
            self.put_lease(change.lease_put.lease)
        elif kind == "leases_renewed":
            expires = _ts(change.leases_renewed, "expires_at")
            for lease_id in change.leases_renewed.lease_ids:
                if lease_id in self.leases:
                    self.leases[lease_id] = self.leases[lease_id][:3] + (expires,)
        elif kind == "lease_released":
            self.leases.pop(change.lease_released, None)
        elif kind == "reset":
            # Seats, leases, license and reconcile history go; the tryout record stays.
            self.seats.clear()
            self.leases.clear()
            self.license = None
            self.reconcile = {"last_success_at": None, "last_attempt_at": None, "failing_outcome": False}
        # "other" (or a kind this copy does not know): only the version moves.

    # -- the rules --
    def entitlement_current(self, feature, now):
        """(present, current) of the license's entitlement of `feature`."""
        e = self.license["entitlements"].get(feature) if self.license else None
        if e is None:
            return False, False
        expires = e[1]
        return True, expires is None or now < expires

    def activation(self, now):
        """NOT_INITIALIZED, ACTIVE, GRACE or LAPSED (activation.rs, decision.rs)."""
        if self.license is None:
            return "NOT_INITIALIZED"
        if not self.has_license_source:
            return "ACTIVE"
        applied = self.license["applied_at"]
        success = self.reconcile["last_success_at"]
        confirmed = applied if success is None else max(success, applied)
        grace_ends = confirmed + self.grace
        attempt = self.reconcile["last_attempt_at"]
        failing = self.reconcile["failing_outcome"] and attempt is not None and attempt >= confirmed
        if now >= grace_ends:
            return "LAPSED"
        return "GRACE" if failing else "ACTIVE"

    def tryout_state(self, now):
        if self.edition != self.pb.EDITION_VM:
            return "UNAVAILABLE"
        t = self.tryout
        if t is None:
            return "AVAILABLE"
        if t["forfeited_at"] is not None:
            return "UNAVAILABLE"
        if t["ended_at"] is not None:
            return "ENDED"
        if now >= t["ends_at"]:
            return "EXPIRED"
        return "ACTIVE"

    def needs_system_activation(self):
        return self.edition != self.pb.EDITION_VM

    def system_activated(self, now):
        if self.license is None:
            return False
        if not self.needs_system_activation():
            return True
        e = self.license["entitlements"].get("system_activation")
        return e is not None and e[0] >= 1 and (e[1] is None or now < e[1])

    def pbx_cause(self, feature, now):
        """Why nobody can hold a licensed seat of `feature` now (seats.rs pbx_cause)."""
        tryout = self.tryout_state(now)
        never_tried = tryout in ("AVAILABLE", "UNAVAILABLE")
        if (self.license is not None or self.needs_system_activation()) and not self.system_activated(now):
            return NOT_ACTIVATED
        if self.license is None and never_tried:
            return NOT_ACTIVATED
        if self.license is not None and self.activation(now) == "LAPSED":
            return LICENSE_LAPSED
        tryout_covers = feature == "user" and tryout == "ACTIVE"
        present, current = self.entitlement_current(feature, now)
        if present and not current and not tryout_covers:
            return LICENSE_LAPSED
        return None

    def own_seat(self, feature, seat, now):
        """(licensed, source, reason) of the user's own seat."""
        purchased, tryout = "SEAT_SOURCE_PURCHASED", "SEAT_SOURCE_TRYOUT"
        if seat is None:
            return False, None, NOT_ASSIGNED
        if seat["source"] == self.pb.SEAT_SOURCE_TRYOUT:
            if self.tryout_state(now) == "ACTIVE":
                return True, tryout, ASSIGNED
            return False, tryout, TRYOUT_OVER
        if self.license is None or not self.system_activated(now):
            return False, purchased, NOT_ACTIVATED
        present, current = self.entitlement_current(feature, now)
        if present and not current:
            return False, purchased, LICENSE_LAPSED
        since = seat["over_capacity_since"]
        if not present and since is None:
            return False, purchased, LICENSE_LAPSED
        if since is not None and now >= since + self.over_capacity_grace:
            return False, purchased, OVER_CAPACITY
        return True, purchased, ASSIGNED

    def own_lease(self, feature, user, seat, now):
        """(licensed, source, reason) on a concurrent feature (seats.rs check_leased):
        a licensed tryout seat still counts; else a live lease of the user."""
        if seat is not None and seat["source"] == self.pb.SEAT_SOURCE_TRYOUT:
            own = self.own_seat(feature, seat, now)
            if own[0]:
                return own
        until = max(
            (v[3] for v in self.leases.values() if v[0] == feature and v[1] == user),
            default=None,
        )
        if until is None or now >= until:
            return False, None, NO_LEASE
        purchased = "SEAT_SOURCE_PURCHASED"
        if self.license is None or not self.system_activated(now):
            return False, purchased, NOT_ACTIVATED
        present, current = self.entitlement_current(feature, now)
        if not (present and current):
            return False, purchased, LICENSE_LAPSED
        return True, purchased, ASSIGNED

    def check_seat(self, user, feature, now):
        seat = self.seats.get((feature, user))
        if self.license is not None and feature in self.license["concurrent"]:
            licensed, source, reason = self.own_lease(feature, user, seat, now)
        else:
            licensed, source, reason = self.own_seat(feature, seat, now)
        if licensed:
            return licensed, source, reason
        cause = self.pbx_cause(feature, now)
        return (False, source, cause) if cause is not None else (licensed, source, reason)


# --- following the stream ---


class WatchSeatsConsumer:
    """Follows WatchSeats on `target` (host:port, or several separated by commas,
    tried in turn) and keeps the copy. Thread-safe: `check_seat` may be called
    from any thread while a background thread applies the stream."""

    def __init__(self, target, features=(), heartbeat_s=5.0, stale_after_beats=3,
                 metadata=(), credentials=None, log=None):
        self.pb, self.pb_grpc = load_stubs()
        self.targets = [t.strip() for t in target.split(",") if t.strip()]
        self.features = list(features)
        self.stale_after_ns = int(heartbeat_s * stale_after_beats * NS)
        self.metadata = list(metadata)
        self.credentials = credentials
        self.log = log or (lambda msg: None)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.state: Optional[SeatState] = None
        self.version = 0
        self.reference = None  # (reference time ns, monotonic ns when read)
        self.last_heard = None  # monotonic ns of the last message
        self.snapshots = 0
        self.changes = 0
        self.heartbeats = 0
        self.connects = 0
        self._stop = threading.Event()
        self._call = None
        self._thread = None

    # -- the decision --
    def now(self):
        """The deployment's time: the last reference time advanced by the monotonic clock."""
        ref, read_at = self.reference
        return ref + (time.monotonic_ns() - read_at)

    def check_seat(self, user, feature="user") -> Decision:
        with self.lock:
            if self.state is None:
                return Decision(None, UNKNOWN)
            stale = time.monotonic_ns() - self.last_heard > self.stale_after_ns
            licensed, source, reason = self.state.check_seat(user, feature, self.now())
            return Decision(licensed, reason, source, stale)

    # -- applying messages --
    def apply(self, m):
        """Applies one WatchSeatsResponse. Returns False when it does not follow
        the copy (a gap): the caller resumes from self.version."""
        kind = m.WhichOneof("kind")
        with self.changed:
            self.last_heard = time.monotonic_ns()
            if kind == "snapshot":
                # Replaces everything, whatever its version (also a lower one).
                self.state = SeatState(self.pb, m.snapshot)
                self.reference = (_ts(m.snapshot, "reference_time"), time.monotonic_ns())
                self.snapshots += 1
            elif kind == "change":
                if self.state is None or m.version != self.version + 1:
                    return False
                self.state.apply_change(m.change)
                self.changes += 1
            elif kind == "heartbeat":
                if self.state is None or m.version != self.version:
                    return False
                self.reference = (_ts(m.heartbeat, "reference_time"), time.monotonic_ns())
                self.heartbeats += 1
            else:
                return True  # a kind this copy does not know: ignore it
            self.version = m.version
            self.changed.notify_all()
            return True

    def wait_for_version(self, version, timeout=10.0):
        """Blocks until the copy holds a snapshot and has reached `version`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state is None or self.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    # -- the connection loop --
    def _channel(self, target):
        if self.credentials is not None:
            return grpc.secure_channel(target, self.credentials)
        return grpc.insecure_channel(target)

    def run(self):
        backoff, attempt = 0.1, 0
        while not self._stop.is_set():
            target = self.targets[attempt % len(self.targets)]
            attempt += 1
            since = self.version if self.state is not None else 0
            epoch = self.state.epoch if self.state is not None else ""
            try:
                with self._channel(target) as channel:
                    stub = self.pb_grpc.LicensingServiceStub(channel)
                    call = stub.WatchSeats(
                        self.pb.WatchSeatsRequest(
                            since_version=since, since_epoch=epoch, features=self.features
                        ),
                        metadata=self.metadata,
                    )
                    self._call = call
                    self.connects += 1
                    self.log(f"connected to {target}, since_version={since}")
                    for m in call:
                        backoff = 0.1
                        if not self.apply(m):
                            self.log(f"gap at version {m.version} (copy at {self.version}): resuming")
                            call.cancel()
                            break
            except grpc.RpcError as e:
                if self._stop.is_set():
                    break
                self.log(f"stream ended: {e.code().name}: {e.details()}")
            finally:
                self._call = None
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 5.0)

    def start(self):
        self._thread = threading.Thread(target=self.run, name="watch-seats", daemon=True)
        self._thread.start()
        return self

    def reconnect(self):
        """Breaks the current stream (as a network failure would): the loop resumes by version."""
        call = self._call
        if call is not None:
            call.cancel()

    def stop(self):
        self._stop.set()
        self.reconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="host:port of the service (several: comma-separated)")
    parser.add_argument("users", nargs="*", default=["alice"])
    parser.add_argument("--feature", default="user")
    parser.add_argument("--token", help="a bearer token (callers file); plaintext: loopback only")
    args = parser.parse_args()
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    consumer = WatchSeatsConsumer(args.target, metadata=metadata, log=lambda s: print("#", s, flush=True))
    for user in args.users:
        print(f"{user}/{args.feature}: {consumer.check_seat(user, args.feature)}", flush=True)
    consumer.start()
    seen = -1
    try:
        while True:
            with consumer.changed:
                consumer.changed.wait(1.0)
            if consumer.state is not None and consumer.version != seen:
                seen = consumer.version
                for user in args.users:
                    d = consumer.check_seat(user, args.feature)
                    print(f"v{seen} {user}/{args.feature}: licensed={d.licensed} "
                          f"reason={d.reason} stale={d.stale}", flush=True)
    except KeyboardInterrupt:
        consumer.stop()


if __name__ == "__main__":
    main()

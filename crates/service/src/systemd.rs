//! The systemd service protocol (`Type=notify`): `READY=1` once the server
//! serves, `STOPPING=1` when it starts to drain, `RELOADING=1` … `READY=1` around
//! a reload, and `WATCHDOG=1` pings when the unit sets `WatchdogSec=`. Messages go
//! as datagrams to the socket named by `NOTIFY_SOCKET`; without it (not under
//! systemd, in-process tests) every function here does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states`; a failure is logged, never fatal (the service serves anyway,
/// and systemd's start timeout tells the operator).
fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

/// The server serves (health says `SERVING`), or serves again after a reload.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown started: in-flight calls are draining.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight calls"),
    ]);
}

/// A reload started; `ready` ends it. The timestamp lets systemd tell this
/// reload from an earlier one.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// Starts the watchdog pings when the unit sets `WatchdogSec=` (systemd passes it
/// as `WATCHDOG_USEC`): a task on the runtime pings at half the interval, so a
/// runtime that stops scheduling tasks stops the pings and systemd restarts it.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = ping_interval(interval);
    tracing::info!(
        watchdog_ms = interval.as_millis() as u64,
        ping_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        // After a stall, ping once, not a burst of missed ones.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

/// Half the watchdog interval, as sd_watchdog_enabled(3) advises, at least 1 ms.
fn ping_interval(watchdog: Duration) -> Duration {
    (watchdog / 2).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_watchdog_interval() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ping_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }
}

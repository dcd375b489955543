//! The background side of a [`Client`](crate::Client): following
//! `WatchSeats` across the endpoints, and keeping the cache file.
//!
//! One stream at a time. A stream ends on an error, at the replica's drain,
//! on a change that does not follow the copy's version, on a message that
//! does not decode, or after three heartbeats of silence (a connection that
//! died without a word); then the next endpoint, after a jittered backoff
//! (short after a stream that delivered, doubling while nothing does), with
//! the copy's version and epoch, so the stream resumes with the changes after
//! it or a new snapshot. The copy is only ever replaced by a snapshot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use comtrexx_licensing_proto::from_timestamp;
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::pb::licensing_service_client::LicensingServiceClient;
use comtrexx_licensing_proto::pb::watch_seats_response::Kind;
use rand::Rng as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::copy::{Applied, SeatCopy};
use crate::{Config, Shared, cache};

/// How a stream ended.
struct Ended {
    /// Whether it delivered anything (a working stream resumes at once).
    delivered: bool,
    why: String,
}

pub(crate) fn load_cache(shared: &Shared) {
    let Some(path) = &shared.config.cache_file else {
        return;
    };
    match cache::read(path, &shared.config.features) {
        Ok(None) => {
            tracing::info!(path = %path.display(), "no cache file yet: no copy until a replica answers")
        }
        Ok(Some(message)) => {
            let Some(Kind::Snapshot(s)) = &message.kind else {
                return;
            };
            match SeatCopy::from_snapshot(message.version, s, shared.key.as_ref(), Instant::now()) {
                Ok(copy) => {
                    tracing::info!(
                        path = %path.display(),
                        version = copy.version,
                        seats = copy.seat_count(),
                        "deciding from the cache file (stale) until a replica answers"
                    );
                    let version = copy.version;
                    *shared.copy.write() = Some(copy);
                    shared.from_cache_file.store(true, Ordering::Relaxed);
                    shared.version.send_replace(Some(version));
                }
                Err(e) => tracing::warn!(path = %path.display(), "cache file not used: {e}"),
            }
        }
        Err(e) => tracing::warn!("{e}; starting without a copy"),
    }
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let n = shared.config.endpoints.len();
    let mut index = rand::thread_rng().gen_range(0..n);
    let mut failures = 0u32;
    loop {
        let endpoint = shared.config.endpoints[index % n].clone();
        let ended = stream_once(&shared, &endpoint).await;
        {
            let mut info = shared.info.lock();
            info.connected = false;
            info.last_error = Some(ended.why.clone());
        }
        tracing::warn!(endpoint, "licensing stream: {}", ended.why);
        failures = if ended.delivered { 0 } else { failures + 1 };
        index += 1;
        tokio::time::sleep(backoff(&shared.config, failures)).await;
    }
}

/// The pause before the next attempt: `backoff_min` after a stream that
/// delivered, doubling per attempt that did not, up to `backoff_max`; each a
/// random point in its upper half (callers restarted together spread out).
fn backoff(config: &Config, failures: u32) -> Duration {
    let exp = config
        .backoff_min
        .saturating_mul(1u32 << failures.min(16))
        .min(config.backoff_max);
    let half = exp / 2;
    half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
}

pub(crate) async fn connect(config: &Config, url: &str) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("endpoint {url:?}: {e}"))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        let settings = config.tls.clone().unwrap_or_default();
        tls = match &settings.ca_pem {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = &settings.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &settings.domain_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS for {url}: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| {
        let mut text = format!("connect {url}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })
}

pub(crate) fn describe(status: &tonic::Status) -> String {
    let reason = tonic_types::StatusExt::get_error_details(status)
        .error_info()
        .map(|i| format!(" ({})", i.reason))
        .unwrap_or_default();
    format!("{:?}{reason}: {}", status.code(), status.message())
}

async fn stream_once(shared: &Shared, url: &str) -> Ended {
    let failed = |why: String| Ended {
        delivered: false,
        why,
    };
    shared.info.lock().endpoint = Some(url.to_owned());
    let channel = match connect(&shared.config, url).await {
        Ok(c) => c,
        Err(why) => return failed(why),
    };
    let (since_version, since_epoch) = match shared.copy.read().as_ref() {
        Some(c) => (c.version, c.epoch.clone()),
        None => (0, String::new()),
    };
    let mut request = tonic::Request::new(pb::WatchSeatsRequest {
        since_version,
        features: shared
            .config
            .features
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect(),
        since_epoch,
    });
    if let Some(token) = &shared.config.token {
        match format!("Bearer {token}").parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => return failed("the token holds characters a header cannot carry".into()),
        }
    }
    let mut stream = match LicensingServiceClient::new(channel)
        .watch_seats(request)
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return failed(format!("WatchSeats on {url}: {}", describe(&status))),
    };
    {
        let mut info = shared.info.lock();
        info.connected = true;
        info.connects += 1;
    }
    tracing::info!(endpoint = url, since_version, "licensing stream open");
    let silence = shared.config.heartbeat * 3;
    let mut delivered = false;
    loop {
        let message = match tokio::time::timeout(silence, stream.message()).await {
            Err(_) => {
                return Ended {
                    delivered,
                    why: format!("no message from {url} for {silence:?}: resuming elsewhere"),
                };
            }
            Ok(Err(status)) => {
                return Ended {
                    delivered,
                    why: format!("stream from {url} ended: {}", describe(&status)),
                };
            }
            Ok(Ok(None)) => {
                return Ended {
                    delivered,
                    why: format!("stream from {url} ended"),
                };
            }
            Ok(Ok(Some(m))) => m,
        };
        delivered = true;
        if let Err(why) = apply(shared, &message) {
            return Ended { delivered, why };
        }
    }
}

/// Applies one message; `Err` ends the stream (it is resumed).
fn apply(shared: &Shared, m: &pb::WatchSeatsResponse) -> Result<(), String> {
    let at = Instant::now();
    let kind = m.kind.as_ref().ok_or("a message without a kind")?;
    let changed = match kind {
        Kind::Snapshot(s) => {
            // Built outside the lock; the old copy is dropped outside it too.
            let copy = SeatCopy::from_snapshot(m.version, s, shared.key.as_ref(), at)
                .map_err(|e| format!("snapshot at version {}: {e}", m.version))?;
            let old = shared.copy.write().replace(copy);
            drop(old);
            true
        }
        Kind::Change(c) => {
            let mut guard = shared.copy.write();
            let copy = guard.as_mut().ok_or("a change before any snapshot")?;
            match copy.apply(m.version, c, shared.key.as_ref()) {
                Ok(Applied::Changed) => true,
                Ok(Applied::Gap { have, got }) => {
                    return Err(format!(
                        "change {got} does not follow the copy's version {have}: resuming"
                    ));
                }
                Err(e) => return Err(format!("change {}: {e}", m.version)),
            }
        }
        Kind::Heartbeat(h) => {
            let mut guard = shared.copy.write();
            let copy = guard.as_mut().ok_or("a heartbeat before any snapshot")?;
            if m.version != copy.version {
                return Err(format!(
                    "heartbeat at version {} but the copy is at {}: resuming",
                    m.version, copy.version
                ));
            }
            if let Some(t) = h.reference_time.as_ref().and_then(from_timestamp) {
                copy.heard(t, at);
            }
            false
        }
    };
    // The stream answered in order: whatever the copy came from, it is live.
    shared.from_cache_file.store(false, Ordering::Relaxed);
    shared
        .last_message
        .store(shared.stamp(at), Ordering::Relaxed);
    if changed {
        shared
            .last_change
            .store(shared.stamp(at), Ordering::Relaxed);
        shared.version.send_replace(Some(m.version));
        shared.changed.notify_one();
    }
    Ok(())
}

/// Writes the copy to the cache file after changes (at most every
/// `cache_interval`) and once a minute without (so its reference time stays
/// recent).
pub(crate) async fn keep_cache(shared: Arc<Shared>) {
    let Some(path) = shared.config.cache_file.clone() else {
        return;
    };
    let mut failing = false;
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(60), shared.changed.notified()).await;
        tokio::time::sleep(shared.config.cache_interval).await;
        let message = {
            let copy = shared.copy.read();
            let from_file = shared.from_cache_file.load(Ordering::Relaxed);
            match copy.as_ref() {
                Some(c) if !from_file => pb::WatchSeatsResponse {
                    version: c.version,
                    kind: Some(Kind::Snapshot(c.to_snapshot(Instant::now()))),
                },
                _ => continue,
            }
        };
        let features = shared.config.features.clone();
        let target = path.clone();
        let result =
            tokio::task::spawn_blocking(move || cache::write(&target, &features, &message)).await;
        match result {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(path = %path.display(), "cache file written again");
                }
                failing = false;
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!("{e}: a restart without a replica will have no copy");
                failing = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_min_to_max_in_the_upper_half() {
        let config = Config {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            ..Config::default()
        };
        for _ in 0..100 {
            let first = backoff(&config, 0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&config, 2);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&config, 40);
            assert!(late >= Duration::from_millis(2500) && late <= Duration::from_secs(5));
        }
    }
}

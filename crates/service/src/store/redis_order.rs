//! Builds the seat order sets (see `lua/prelude.lua`, "Seat order") of a store
//! that lacks them: written before they existed, or by a replica that does not
//! keep them. In pages, never as one call: the pool is read by `HSCAN` on the
//! bulk connection, and each page's seats are put into the sets as they are at
//! that moment by a small script. Writes made meanwhile keep the sets
//! themselves; the build ends true at the version it ends at only when every
//! one of them did (their feed entries say so), else it runs again. One
//! replica builds at a time (a mark that lives while its pages come); the
//! others wait for it.

use std::time::{Duration, Instant};

use redis::Value;

use super::{ORDER_BEGIN, ORDER_FINISH, ORDER_PAGE, RedisStore, skip_corrupt, strings, texts};
use crate::domain::{Feature, SeatSource};
use crate::store::StoreError;

/// How long a build's mark lives without a page (then another replica may
/// start over).
const MARK_MS: u64 = 10_000;
/// How long a write waits for a build (its own or another replica's).
const WAIT: Duration = Duration::from_secs(60);
/// Users one page script puts into the sets.
const PAGE: usize = 1000;

impl RedisStore {
    /// Builds the order sets, or waits for another replica's build; `Ok` once
    /// they are true (or a build ended), `Unavailable` after [`WAIT`].
    pub(super) async fn build_order(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let id = super::new_epoch();
        let mut pause = Duration::from_millis(50);
        // The write that asked found the sets untrue (or a record in them
        // unreadable): the first attempt builds even when they look true.
        let mut force = true;
        loop {
            if started.elapsed() > WAIT {
                return Err(StoreError::Unavailable(format!(
                    "the seat order sets are still being built after {} s: try again",
                    WAIT.as_secs()
                )));
            }
            let began = self.order_begin(&id, force).await?;
            force = false;
            match began.as_str() {
                "done" => return Ok(()),
                "busy" => {
                    tokio::time::sleep(crate::store::jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
                "started" => {}
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "order build began with {other:?}"
                    )));
                }
            }
            let mut pages = 0usize;
            let mut lost = false;
            'pools: for feature in Feature::SEATS {
                let key = self.keys.pool(feature, SeatSource::Purchased);
                let mut cursor = String::from("0");
                let mut count = super::snapshot::SCAN_COUNT;
                loop {
                    let ((next, flat),): ((String, Value),) = self
                        .bulk(&mut count, |n| {
                            let mut pipe = redis::pipe();
                            pipe.cmd("HSCAN").arg(&key).arg(&cursor).arg("COUNT").arg(n);
                            pipe
                        })
                        .await?;
                    let users: Vec<Vec<u8>> = texts(flat)?
                        .chunks_exact(2)
                        .map(|pair| match &pair[0] {
                            Ok(user) => user.clone().into_bytes(),
                            Err(lossy) => lossy.clone().into_bytes(),
                        })
                        .collect();
                    for chunk in users.chunks(PAGE) {
                        pages += 1;
                        if !self.order_page(&id, feature, chunk).await? {
                            lost = true;
                            break 'pools;
                        }
                    }
                    if next == "0" {
                        break;
                    }
                    cursor = next;
                }
            }
            if lost {
                tracing::info!("seat order build taken over by another replica; waiting for it");
                continue;
            }
            match self.order_finish(&id).await?.as_str() {
                "ok" => {
                    tracing::info!(
                        pages,
                        elapsed_ms =
                            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "built the seat order sets of the purchased pools in pages (once per store)"
                    );
                    return Ok(());
                }
                "again" => tracing::warn!(
                    "a write that does not keep the seat order sets came during their build \
                     (a replica of an older version?), or the feed was trimmed past its start; \
                     building them again"
                ),
                _ => {}
            }
        }
    }

    async fn order_begin(&self, id: &str, force: bool) -> Result<String, StoreError> {
        let mut inv = ORDER_BEGIN.prepare_invoke();
        inv.key(self.keys.version())
            .key(self.keys.order_at())
            .key(self.keys.order_build())
            .arg(id)
            .arg(MARK_MS)
            .arg(if force { "force" } else { "" });
        for feature in Feature::SEATS {
            inv.key(self.keys.order(feature))
                .key(self.keys.flagged(feature));
        }
        let mut conn = self.conn.clone();
        let reply = strings(
            self.bounded("order_build", inv.invoke_async(&mut conn))
                .await?,
        )?;
        Ok(reply.into_iter().next().unwrap_or_default())
    }

    /// One page; `false` when the build is no longer this builder's.
    async fn order_page(
        &self,
        id: &str,
        feature: Feature,
        users: &[Vec<u8>],
    ) -> Result<bool, StoreError> {
        let mut inv = ORDER_PAGE.prepare_invoke();
        self.order_keys(&mut inv)
            .key(self.keys.pool(feature, SeatSource::Purchased))
            .key(self.keys.order(feature))
            .key(self.keys.flagged(feature))
            .arg("")
            .arg(id)
            .arg(MARK_MS)
            .arg(feature.as_str());
        for user in users {
            inv.arg(user.as_slice());
        }
        let mut conn = self.conn.clone();
        let reply = skip_corrupt(
            "order_build",
            strings(
                self.bounded("order_build", inv.invoke_async(&mut conn))
                    .await?,
            )?,
        )?;
        Ok(reply.first().map(String::as_str) == Some("ok"))
    }

    async fn order_finish(&self, id: &str) -> Result<String, StoreError> {
        let mut inv = ORDER_FINISH.prepare_invoke();
        self.order_keys(&mut inv).arg("").arg(id);
        let mut conn = self.conn.clone();
        let reply = strings(
            self.bounded("order_build", inv.invoke_async(&mut conn))
                .await?,
        )?;
        Ok(reply.into_iter().next().unwrap_or_default())
    }

    /// The prelude's keys and the build's mark: KEYS[1..5].
    fn order_keys<'a>(
        &self,
        inv: &'a mut redis::ScriptInvocation<'static>,
    ) -> &'a mut redis::ScriptInvocation<'static> {
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.feed())
            .key(self.keys.order_at())
            .key(self.keys.order_build())
    }
}

//! Reload of what may change in place, on SIGHUP (`systemctl reload`): a registry
//! of named reloadable parts. Each part re-reads its own file and takes the new
//! content only when it is good; a part that fails keeps what it runs with, and
//! the failure is logged with the part's name. One failing part does not stop the
//! others from reloading.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::systemd;

/// One part's reload: re-read, validate, swap in; `Err` leaves the running state.
type ReloadFn = Box<dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// The reloadable parts, in the order they were registered (and are reloaded).
#[derive(Default)]
pub struct Reloads {
    parts: Vec<(&'static str, ReloadFn)>,
}

/// What one part's reload did.
#[derive(Debug)]
pub struct Outcome {
    pub part: &'static str,
    /// The reason, with its causes, when the part kept its running state.
    pub error: Option<String>,
}

impl Reloads {
    /// Adds a part. `reload` is called on every reload; a synchronous reload is
    /// registered as `move || { let x = x.clone(); async move { x.reload() } }`.
    pub fn register<F, Fut>(&mut self, part: &'static str, reload: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.parts.push((
            part,
            Box::new(move || Box::pin(reload()) as BoxFuture<'static, _>),
        ));
    }

    /// Adds a part whose reload is a quick synchronous re-read of a small file
    /// (e.g. `move || callers.reload()`); its error becomes the reload's.
    pub fn register_sync<F, E>(&mut self, part: &'static str, reload: F)
    where
        F: Fn() -> Result<(), E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        self.register(part, move || {
            let result = reload().map_err(|e| anyhow::anyhow!("{e}"));
            async move { result }
        });
    }

    /// The registered parts' names.
    pub fn parts(&self) -> Vec<&'static str> {
        self.parts.iter().map(|(name, _)| *name).collect()
    }

    /// Reloads every part, one after the other, and logs each outcome.
    pub async fn reload_all(&self) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(self.parts.len());
        for (part, reload) in &self.parts {
            let error = match reload().await {
                Ok(()) => {
                    tracing::info!(part, "reloaded");
                    None
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    // The operator's change did not take effect: they must act.
                    tracing::error!(part, %error, "reload failed; keeping the running state");
                    Some(error)
                }
            };
            outcomes.push(Outcome { part, error });
        }
        outcomes
    }
}

/// Installs the SIGHUP handler now (so that a SIGHUP from here on never
/// terminates the process) and reloads all parts on each one, telling systemd
/// `RELOADING=1` before and `READY=1` (with a status line naming failed parts) after.
#[cfg(unix)]
pub fn spawn_on_sighup(reloads: Arc<Reloads>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(parts = ?reloads.parts(), "SIGHUP received: reloading");
            systemd::reloading();
            let outcomes = reloads.reload_all().await;
            let failed: Vec<_> = outcomes
                .iter()
                .filter(|o| o.error.is_some())
                .map(|o| o.part)
                .collect();
            let status = if failed.is_empty() {
                "serving; last reload succeeded".to_owned()
            } else {
                format!("serving; last reload failed for: {}", failed.join(", "))
            };
            systemd::ready(&status);
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_failing_part_is_reported_and_does_not_stop_the_others() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut reloads = Reloads::default();
        reloads.register("broken", || async {
            Err(anyhow::anyhow!("parse").context("read broken.toml"))
        });
        reloads.register_sync("broken sync", || {
            Err::<(), _>("callers.toml: line 3: unknown role")
        });
        let counter = calls.clone();
        reloads.register("good", move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let counter = calls.clone();
        reloads.register_sync("good sync", move || {
            counter.fetch_add(10, Ordering::SeqCst);
            Ok::<(), String>(())
        });
        assert_eq!(
            reloads.parts(),
            ["broken", "broken sync", "good", "good sync"]
        );

        let outcomes = reloads.reload_all().await;
        let parts: Vec<_> = outcomes.iter().map(|o| o.part).collect();
        assert_eq!(parts, ["broken", "broken sync", "good", "good sync"]);
        let error = outcomes[0].error.as_deref().expect("broken part fails");
        assert!(
            error.contains("broken.toml") && error.contains("parse"),
            "{error}"
        );
        let error = outcomes[1]
            .error
            .as_deref()
            .expect("broken sync part fails");
        assert!(error.contains("callers.toml"), "{error}");
        assert!(outcomes[2].error.is_none() && outcomes[3].error.is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 11, "both good parts ran");

        reloads.reload_all().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            22,
            "every reload calls each part"
        );
    }
}

//! The `redis_*` keys: the URL (one server or the sentinels of a master), the
//! credentials and the file names; the files are read by `app`.

use std::time::Duration;

use super::{
    ConfigError, RawConfig, RedisConfig, RedisOptions, RedisTarget, WaitPolicy, invalid, within,
};

impl RawConfig {
    /// The `redis_*` keys; `None` without a `redis_url` (the in-memory store).
    /// The password and CA files are named, not read.
    pub(super) fn redis(&self) -> Result<Option<RedisOptions>, ConfigError> {
        within("redis_timeout_ms", self.redis_timeout_ms, 1..=60_000)?;
        let Some(url) = self.redis_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (url_user, url_password, location) = redis_url_credentials(rest)?;
        let target = redis_target(scheme, location)?;
        // The keys win over the URL's credentials.
        let (password, password_file) = match (&self.redis_password, &self.redis_password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "redis_password_file",
                    "set either redis_password or redis_password_file, not both",
                ));
            }
            (Some(p), None) => (Some(p.clone()), None),
            (None, Some(path)) => (None, Some(path.clone())),
            (None, None) => (url_password, None),
        };
        let username = self
            .redis_username
            .clone()
            .filter(|u| !u.is_empty())
            .or(url_user);
        if username.is_some() && password.is_none() && password_file.is_none() {
            return Err(invalid(
                "redis_password",
                "an ACL user (redis_username or the URL's user) needs a password: set redis_password or redis_password_file",
            ));
        }
        if self.redis_tls_ca_file.is_some() && scheme != "rediss" {
            return Err(invalid(
                "redis_tls_ca_file",
                "is only used with a rediss:// redis_url",
            ));
        }
        within("redis_wait_replicas", self.redis_wait_replicas, 0..=100)?;
        within(
            "redis_wait_timeout_ms",
            self.redis_wait_timeout_ms,
            1..=60_000,
        )?;
        Ok(Some(RedisOptions {
            connection: RedisConfig {
                url: url.to_owned(),
                target,
                username,
                password,
                tls_ca: None,
                timeout: Duration::from_millis(self.redis_timeout_ms),
                wait: (self.redis_wait_replicas > 0).then(|| WaitPolicy {
                    replicas: self.redis_wait_replicas,
                    timeout: Duration::from_millis(self.redis_wait_timeout_ms),
                }),
            },
            password_file,
            tls_ca_file: self.redis_tls_ca_file.clone(),
        }))
    }
}

/// The user and password in a Redis URL (after `scheme://`), decoded, and the
/// rest of it.
#[allow(clippy::type_complexity)]
fn redis_url_credentials(
    rest: &str,
) -> Result<(Option<String>, Option<String>, &str), ConfigError> {
    let Some((auth, location)) = rest.rsplit_once('@') else {
        return Ok((None, None, rest));
    };
    let (user, password) = match auth.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (auth, None),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| invalid("redis_url", "credentials are not UTF-8"))
    };
    Ok((
        Some(decode(user)?).filter(|u| !u.is_empty()),
        password.map(decode).transpose()?,
        location,
    ))
}

/// Where Redis is: one server, or the sentinels of a master.
fn redis_target(scheme: &str, location: &str) -> Result<RedisTarget, ConfigError> {
    match scheme {
        "redis" | "rediss" | "redis+unix" | "unix" => Ok(RedisTarget::Direct {
            url: format!("{scheme}://{location}"),
        }),
        "redis+sentinel" => {
            let (hosts, master_name) = location.split_once('/').unwrap_or((location, ""));
            let master_name = master_name.trim_end_matches('/');
            if master_name.is_empty() || master_name.contains(['/', '?', '#']) {
                return Err(invalid(
                    "redis_url",
                    "a redis+sentinel:// URL ends with /MASTER_NAME",
                ));
            }
            let sentinels = hosts
                .split(',')
                .map(sentinel_address)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid("redis_url", m))?;
            Ok(RedisTarget::Sentinel {
                sentinels,
                master_name: master_name.to_owned(),
            })
        }
        _ => Err(invalid(
            "redis_url",
            "must start with redis://, rediss://, unix:// or redis+sentinel://",
        )),
    }
}

/// `host[:port]` (or `[v6]:port`) of a sentinel; port 26379 when omitted.
fn sentinel_address(raw: &str) -> Result<(String, u16), String> {
    let bad = || format!("sentinel {raw:?} is not host:port");
    let (host, port) = match raw.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        }
        None => match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        },
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => 26379,
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

//! The configuration's unit tests.
// figment::Jail's closures return figment's (large) error type.
#![allow(clippy::result_large_err)]

use super::*;
use crate::auth::AuthMode;
use crate::domain::license::encode_public_key;
use ed25519_dalek::SigningKey;
use figment::Jail;

type Mutation = Box<dyn Fn(&mut RawConfig)>;

#[test]
fn defaults_validate() {
    let c = RawConfig::default().validate().unwrap();
    assert_eq!(c.listen_addr.port(), 50051);
    assert!(c.redis.is_none());
    assert!(c.serial_is_placeholder);
    assert_eq!(c.tryout, TryoutPolicy { days: 14, seats: 3 });
    assert_eq!(c.edition, Edition::Vm);
}

#[test]
fn env_overrides_file_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "licensing.toml",
            "serial_number = \"FILE-1\"\nedition = \"business\"\n[tryout]\ndays = 10\n",
        )?;
        jail.set_env("LICENSING_TRYOUT__DAYS", "7");
        jail.set_env("LICENSING_REDIS_URL", "redis://127.0.0.1:6379");
        jail.set_env("LICENSING_CONFIG", "licensing.toml");
        let raw = RawConfig::load(Some(Path::new("licensing.toml"))).unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.serial_number.as_str(), "FILE-1");
        assert_eq!(c.edition, Edition::Business);
        assert_eq!(c.tryout.days, 7);
        assert_eq!(
            c.redis.unwrap().connection.timeout,
            Duration::from_millis(250)
        );
        Ok(())
    });
}

#[test]
fn the_lease_length_defaults_to_90_s_and_is_set_by_env() {
    assert_eq!(
        RawConfig::default().validate().unwrap().lease_duration,
        Duration::from_secs(90)
    );
    Jail::expect_with(|jail| {
        jail.set_env("LICENSING_LEASES__DURATION_SECONDS", "5");
        let c = RawConfig::load(None).unwrap().validate().unwrap();
        assert_eq!(c.lease_duration, Duration::from_secs(5));
        jail.set_env("LICENSING_LEASES__DURATION_SECONDS", "3600");
        let c = RawConfig::load(None).unwrap().validate().unwrap();
        assert_eq!(c.lease_duration, Duration::from_secs(3600));
        Ok(())
    });
}

#[test]
fn unknown_keys_are_rejected() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "serial_numbr = \"x\"\n")?;
        let err = RawConfig::load(Some(Path::new("c.toml"))).unwrap_err();
        assert!(err.to_string().contains("serial_numbr"), "{err}");
        jail.clear_env();
        jail.set_env("LICENSING_TRYOUT__WEEKS", "2");
        let err = RawConfig::load(None).unwrap_err();
        assert!(err.to_string().contains("LICENSING_TRYOUT__WEEKS"), "{err}");
        Ok(())
    });
}

#[test]
fn invalid_values_name_their_key() {
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|c| c.listen_addr = "nowhere".into()),
            "listen_addr",
        ),
        (Box::new(|c| c.redis_timeout_ms = 0), "redis_timeout_ms"),
        (Box::new(|c| c.clock.max_skew_ms = 999), "clock.max_skew_ms"),
        (
            Box::new(|c| c.leases.duration_seconds = 4),
            "leases.duration_seconds",
        ),
        (
            Box::new(|c| c.leases.duration_seconds = 3601),
            "leases.duration_seconds",
        ),
        (
            Box::new(|c| c.clock.max_skew_ms = MAX_CLOCK_SKEW_MS + 1),
            "clock.max_skew_ms",
        ),
        (
            Box::new(|c| c.redis_url = Some("http://x".into())),
            "redis_url",
        ),
        (
            Box::new(|c| c.redis_url = Some("redis+sentinel://s1:26379".into())),
            "redis_url",
        ),
        (
            Box::new(|c| c.redis_url = Some("redis+sentinel://s1:port/m".into())),
            "redis_url",
        ),
        (
            Box::new(|c| {
                c.redis_url = Some("redis://r:6379".into());
                c.redis_password = Some("a".into());
                c.redis_password_file = Some("p".into());
            }),
            "redis_password_file",
        ),
        (
            Box::new(|c| {
                c.redis_url = Some("redis://r:6379".into());
                c.redis_username = Some("licensing".into());
            }),
            "redis_password",
        ),
        (
            Box::new(|c| {
                c.redis_url = Some("redis://r:6379".into());
                c.redis_tls_ca_file = Some("ca.pem".into());
            }),
            "redis_tls_ca_file",
        ),
        (
            Box::new(|c| {
                c.redis_url = Some("redis://r:6379".into());
                c.redis_wait_replicas = 101;
            }),
            "redis_wait_replicas",
        ),
        (
            Box::new(|c| {
                c.redis_url = Some("redis://r:6379".into());
                c.redis_wait_timeout_ms = 0;
            }),
            "redis_wait_timeout_ms",
        ),
        (
            Box::new(|c| c.serial_number = "a b".into()),
            "serial_number",
        ),
        (Box::new(|c| c.edition = "pro".into()), "edition"),
        (Box::new(|c| c.tryout.days = 0), "tryout.days"),
        (Box::new(|c| c.tryout.seats = 0), "tryout.seats"),
        (
            Box::new(|c| c.vendor_public_key = Some("AAAA".into())),
            "vendor_public_key",
        ),
        (
            Box::new(|c| c.license_file = Some("l.json".into())),
            "vendor_public_key",
        ),
        (Box::new(|c| c.log.format = "xml".into()), "log.format"),
        (Box::new(|c| c.log.level = "loud=,=".into()), "log.level"),
        (
            Box::new(|c| c.trace.level = "loud=,=".into()),
            "trace.level",
        ),
        (
            Box::new(|c| c.trace.sampling_ratio = 1.5),
            "trace.sampling_ratio",
        ),
        (
            Box::new(|c| c.tls.cert_file = Some("c.pem".into())),
            "tls.key_file",
        ),
        (Box::new(|c| c.grace_days = 0), "grace_days"),
        (
            Box::new(|c| c.lapse_action = "panic".into()),
            "lapse_action",
        ),
        (
            Box::new(|c| c.reconcile.interval_secs = 0),
            "reconcile.interval_secs",
        ),
        (
            Box::new(|c| c.reconcile.jitter_percent = 90),
            "reconcile.jitter_percent",
        ),
        (
            Box::new(|c| c.initialization.code_ttl_minutes = 0),
            "initialization.code_ttl_minutes",
        ),
        (
            Box::new(|c| c.licensing_server.url = Some("ftp://x".into())),
            "licensing_server.url",
        ),
        (
            Box::new(|c| {
                c.licensing_server.url = Some("https://cic.example".into());
                c.license_file = Some("l.json".into());
            }),
            "licensing_server.url",
        ),
        (
            Box::new(|c| c.licensing_server.url = Some("https://cic.example".into())),
            "vendor_public_key",
        ),
        (
            Box::new(|c| c.limits.max_message_bytes = 100),
            "limits.max_message_bytes",
        ),
        (
            Box::new(|c| c.limits.rpc_deadline_ms = 0),
            "limits.rpc_deadline_ms",
        ),
        (
            Box::new(|c| c.limits.keepalive_interval_ms = 10),
            "limits.keepalive_interval_ms",
        ),
        (
            Box::new(|c| c.limits.keepalive_timeout_ms = 0),
            "limits.keepalive_timeout_ms",
        ),
        (
            Box::new(|c| c.limits.max_connection_age_ms = 0),
            "limits.max_connection_age_ms",
        ),
        (
            Box::new(|c| c.limits.max_connection_age_grace_ms = u64::MAX),
            "limits.max_connection_age_grace_ms",
        ),
        (
            Box::new(|c| c.limits.concurrent_hot_path = 0),
            "limits.concurrent_hot_path",
        ),
        (
            Box::new(|c| c.limits.concurrent_writes = 0),
            "limits.concurrent_writes",
        ),
        (
            Box::new(|c| c.limits.concurrent_operator_reads = 0),
            "limits.concurrent_operator_reads",
        ),
        (
            Box::new(|c| c.limits.watch_subscribers_per_caller = 0),
            "limits.watch_subscribers_per_caller",
        ),
        (
            Box::new(|c| c.limits.activation_per_minute = 0),
            "limits.activation_per_minute",
        ),
        (
            Box::new(|c| c.limits.caller_share_percent = 101),
            "limits.caller_share_percent",
        ),
        (
            Box::new(|c| c.limits.request_body_timeout_ms = 0),
            "limits.request_body_timeout_ms",
        ),
        (
            Box::new(|c| c.limits.max_streams_per_connection = 0),
            "limits.max_streams_per_connection",
        ),
        (
            Box::new(|c| c.limits.handshake_timeout_ms = 60_001),
            "limits.handshake_timeout_ms",
        ),
        (
            Box::new(|c| c.limits.max_connections = 0),
            "limits.max_connections",
        ),
        (
            Box::new(|c| c.limits.max_connections_per_peer = 0),
            "limits.max_connections_per_peer",
        ),
        (
            Box::new(|c| c.limits.health_watches = 0),
            "limits.health_watches",
        ),
        (
            Box::new(|c| c.limits.health_watches_per_peer = 0),
            "limits.health_watches_per_peer",
        ),
        (
            Box::new(|c| c.limits.activation_burst = 0),
            "limits.activation_burst",
        ),
        (Box::new(|c| c.auth.mode = "open".into()), "auth.mode"),
        (
            Box::new(|c| c.auth.mode = "enforce".into()),
            "auth.callers_file",
        ),
        (
            Box::new(|c| c.auth.reload_interval_ms = 0),
            "auth.reload_interval_ms",
        ),
        (Box::new(|c| c.audit.max_entries = 0), "audit.max_entries"),
        (Box::new(|c| c.audit.max_refusals = 0), "audit.max_refusals"),
        (Box::new(|c| c.audit.max_age_days = 0), "audit.max_age_days"),
        (
            Box::new(|c| c.tls.client_ca_file = Some("ca.pem".into())),
            "tls.client_ca_file",
        ),
    ];
    for (mutate, key) in cases {
        let mut raw = RawConfig::default();
        mutate(&mut raw);
        match raw.validate() {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
            other => panic!("expected an error for {key}, got {other:?}"),
        }
    }
}

#[test]
fn auth_and_audit_keys_come_from_file_and_environment() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "callers.toml",
            "[[caller]]\nname = \"pbx\"\nrole = \"call_handling\"\ncertificate = \"spiffe://pbx\"\n",
        )?;
        jail.create_file(
            "c.toml",
            "[auth]\nmode = \"enforce\"\ncallers_file = \"callers.toml\"\n[audit]\nmax_entries = 50\n",
        )?;
        jail.set_env("LICENSING_AUDIT__MAX_AGE_DAYS", "7");
        let c = RawConfig::load(Some(Path::new("c.toml")))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.auth.mode, AuthMode::Enforce);
        assert_eq!(c.audit.max_entries, 50);
        assert_eq!(c.audit.max_age, chrono::Duration::days(7));
        assert_eq!(
            c.auth.callers_file.as_deref(),
            Some(Path::new("callers.toml"))
        );
        Ok(())
    });
    let defaults = RawConfig::default().validate().unwrap();
    assert_eq!(defaults.auth.mode, AuthMode::Protected);
    assert_eq!(defaults.audit, AuditRetention::default());
}

#[test]
fn a_built_in_vendor_key_refuses_another_unless_development() {
    let built_in = encode_public_key(&SigningKey::from_bytes(&[1; 32]).verifying_key());
    let other = encode_public_key(&SigningKey::from_bytes(&[2; 32]).verifying_key());
    let anchor = parse_public_key(&built_in).unwrap();
    // Nothing configured: the built-in key is used.
    let c = RawConfig::default()
        .validate_with_anchor(Some(&built_in))
        .unwrap();
    assert_eq!(c.vendor_public_key, Some(anchor));
    // The same key configured: fine.
    let same = RawConfig {
        vendor_public_key: Some(built_in.clone()),
        ..RawConfig::default()
    };
    assert!(same.validate_with_anchor(Some(&built_in)).is_ok());
    // Another key: refused, naming the key.
    let mut raw = RawConfig {
        vendor_public_key: Some(other.clone()),
        ..RawConfig::default()
    };
    match raw.validate_with_anchor(Some(&built_in)) {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "vendor_public_key"),
        other => panic!("another vendor key must be refused, got {other:?}"),
    }
    // ... unless the installation says it is a development one.
    raw.development_installation = true;
    let c = raw.validate_with_anchor(Some(&built_in)).unwrap();
    assert!(c.development_installation);
    assert_eq!(c.vendor_public_key, Some(parse_public_key(&other).unwrap()));
    // Without a built-in key any configured key is trusted, as before.
    raw.development_installation = false;
    assert!(raw.validate_with_anchor(None).is_ok());
}

#[test]
fn a_plain_http_licensing_server_needs_a_development_installation() {
    let key = encode_public_key(&SigningKey::from_bytes(&[1; 32]).verifying_key());
    let mut raw = RawConfig {
        vendor_public_key: Some(key),
        licensing_server: RawLicensingServer {
            url: Some("http://127.0.0.1:7443".into()),
            ..RawLicensingServer::default()
        },
        ..RawConfig::default()
    };
    match raw.validate_with_anchor(None) {
        Err(ConfigError::Invalid { key, message }) => {
            assert_eq!(key, "licensing_server.url");
            assert!(message.contains("https://"), "{message}");
            assert!(message.contains("development_installation"), "{message}");
        }
        other => panic!("http:// must be refused, got {other:?}"),
    }
    raw.development_installation = true;
    assert!(raw.validate_with_anchor(None).is_ok());
    raw.development_installation = false;
    raw.licensing_server.url = Some("https://cic.example".into());
    assert!(raw.validate_with_anchor(None).is_ok());
}

#[test]
fn service_links_are_ignored_other_unknown_variables_are_not() {
    // What Kubernetes injects for a Service `licensing-comtrexx-licensing` with
    // ports grpc 50051 and metrics 9090.
    let links = [
        "LICENSING_COMTREXX_LICENSING_SERVICE_HOST",
        "LICENSING_COMTREXX_LICENSING_SERVICE_PORT",
        "LICENSING_COMTREXX_LICENSING_SERVICE_PORT_GRPC",
        "LICENSING_COMTREXX_LICENSING_SERVICE_PORT_METRICS",
        "LICENSING_COMTREXX_LICENSING_PORT",
        "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP",
        "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_PROTO",
        "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_PORT",
        "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_ADDR",
        "LICENSING_COMTREXX_LICENSING_PORT_9090_TCP_ADDR",
        "LICENSING_SIM_PORT_8443_UDP",
        // A Service named just `licensing`.
        "LICENSING_SERVICE_HOST",
        "LICENSING_SERVICE_PORT",
        "LICENSING_PORT",
        "LICENSING_PORT_50051_TCP_ADDR",
    ];
    for var in links {
        assert!(is_service_link(&var["LICENSING_".len()..]), "{var}");
    }
    for key in [
        "listen_addr",
        "metrics_addr",
        "serial_numbr",
        "transport",
        "x_service_hosts",
        "x_port_http_tcp",
        "x_port_1_tcp_extra",
        "tryout__port",
    ] {
        assert!(!is_service_link(key), "{key}");
    }
    Jail::expect_with(|jail| {
        jail.clear_env();
        for var in links {
            jail.set_env(var, "10.0.0.1");
        }
        jail.set_env("LICENSING_SERIAL_NUMBER", "K8S-1");
        let raw = RawConfig::load(None).unwrap();
        assert_eq!(raw.serial_number, "K8S-1");
        assert_eq!(ignored_service_links().len(), links.len());
        // Any other unknown variable still fails, naming itself.
        jail.set_env("LICENSING_SERIAL_NUMBR", "x");
        let err = RawConfig::load(None).unwrap_err();
        assert!(err.to_string().contains("LICENSING_SERIAL_NUMBR"), "{err}");
        Ok(())
    });
}

#[test]
fn wrong_types_name_their_key() {
    Jail::expect_with(|jail| {
        jail.set_env("LICENSING_TRYOUT__DAYS", "fourteen");
        let err = RawConfig::load(None).unwrap_err();
        assert!(
            err.to_string().to_lowercase().contains("tryout.days"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn redis_targets_credentials_and_file_names() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "LICENSING_REDIS_URL",
            "redis+sentinel://app:url%40pw@s1:26380,s2,[::1]:26381/seats",
        );
        jail.set_env("LICENSING_REDIS_WAIT_REPLICAS", "1");
        let r = RawConfig::load(None)
            .unwrap()
            .validate()
            .unwrap()
            .redis
            .unwrap()
            .connection;
        assert_eq!(
            r.target,
            RedisTarget::Sentinel {
                sentinels: vec![
                    ("s1".into(), 26380),
                    ("s2".into(), 26379),
                    ("::1".into(), 26381)
                ],
                master_name: "seats".into(),
            }
        );
        assert_eq!(
            (r.username.as_deref(), r.password.as_deref()),
            (Some("app"), Some("url@pw"))
        );
        assert_eq!(
            r.wait,
            Some(WaitPolicy {
                replicas: 1,
                timeout: Duration::from_millis(100)
            })
        );
        // The keys win over the URL; the files are named, not read.
        jail.set_env("LICENSING_REDIS_URL", "rediss://old:pw@r:6380/2");
        jail.set_env("LICENSING_REDIS_USERNAME", "licensing");
        jail.set_env("LICENSING_REDIS_PASSWORD_FILE", "password");
        jail.set_env("LICENSING_REDIS_TLS_CA_FILE", "ca.pem");
        let r = RawConfig::load(None)
            .unwrap()
            .validate()
            .unwrap()
            .redis
            .unwrap();
        assert_eq!(
            r.connection.target,
            RedisTarget::Direct {
                url: "rediss://r:6380/2".into()
            }
        );
        assert_eq!(
            (r.connection.username.as_deref(), r.connection.password),
            (Some("licensing"), None)
        );
        assert_eq!(r.password_file.as_deref(), Some(Path::new("password")));
        assert_eq!(r.tls_ca_file.as_deref(), Some(Path::new("ca.pem")));
        assert!(r.connection.tls_ca.is_none());
        Ok(())
    });
}

/// The files a configuration names are not read (nor looked at) when it is
/// validated: a configuration naming only missing files validates, and
/// carries their paths (`app::ConfigFiles` reads them).
#[test]
fn validation_reads_no_file() {
    let raw = RawConfig {
        redis_url: Some("rediss://licensing@r:6380".into()),
        redis_password_file: Some("/nonexistent/password".into()),
        redis_tls_ca_file: Some("/nonexistent/ca.pem".into()),
        auth: RawAuth {
            callers_file: Some("/nonexistent/callers.toml".into()),
            ..RawAuth::default()
        },
        tls: RawTls {
            cert_file: Some("/nonexistent/tls.crt".into()),
            key_file: Some("/nonexistent/tls.key".into()),
            client_ca_file: Some("/nonexistent/clients.pem".into()),
            ..RawTls::default()
        },
        // A file, not a directory: also `app`'s to find out.
        state_dir: Some("Cargo.toml".into()),
        license_file: Some("/nonexistent/license.json".into()),
        vendor_public_key: Some(encode_public_key(
            &SigningKey::from_bytes(&[1; 32]).verifying_key(),
        )),
        ..RawConfig::default()
    };
    let c = raw.validate_with_anchor(None).unwrap();
    let redis = c.redis.unwrap();
    assert_eq!(
        redis.password_file.as_deref(),
        Some(Path::new("/nonexistent/password"))
    );
    assert_eq!(
        redis.tls_ca_file.as_deref(),
        Some(Path::new("/nonexistent/ca.pem"))
    );
    assert_eq!(
        c.auth.callers_file.as_deref(),
        Some(Path::new("/nonexistent/callers.toml"))
    );
    assert_eq!(c.tls.unwrap().cert_file, Path::new("/nonexistent/tls.crt"));
    assert_eq!(c.state_dir.as_deref(), Some(Path::new("Cargo.toml")));
    assert_eq!(
        c.license_source,
        LicenseSource::File("/nonexistent/license.json".into())
    );
}

#[test]
fn secrets_are_redacted() {
    let raw = RawConfig {
        redis_url: Some("redis://:hunter2@redis:6379".into()),
        redis_password: Some("hunter3".into()),
        ..RawConfig::default()
    };
    let text = raw.redacted_toml();
    assert!(
        !text.contains("hunter2") && !text.contains("hunter3"),
        "{text}"
    );
    assert!(text.contains("[tryout]"), "{text}");
    let c = raw.validate().unwrap().redis.unwrap().connection;
    assert_eq!(c.password.as_deref(), Some("hunter3"));
    assert!(!format!("{c:?}").contains("hunter"), "{c:?}");
}

#[test]
fn limits_come_from_file_and_env() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[limits]\nmax_message_bytes = 8192\nconcurrent_writes = 4\n",
        )?;
        jail.set_env("LICENSING_LIMITS__RPC_DEADLINE_MS", "1500");
        let c = RawConfig::load(Some(Path::new("c.toml")))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.limits.max_message_bytes, 8192);
        assert_eq!(c.limits.budgets.writes, 4);
        assert_eq!(c.limits.rpc_deadline, Duration::from_millis(1500));
        assert_eq!(
            c.limits.budgets.hot_path,
            crate::limits::Limits::default().budgets.hot_path
        );
        jail.set_env("LICENSING_LIMITS__MAX_MESSAGE_BYTE", "1");
        assert!(RawConfig::load(None).is_err());
        Ok(())
    });
}

#[test]
fn default_limits_validate_to_the_defaults() {
    assert_eq!(
        RawLimits::default().validate().unwrap(),
        crate::limits::Limits::default()
    );
}

/// The load error of the environment `env` and the file `file` (if any).
fn load_error(env: &[(&str, &str)], file: Option<&str>) -> String {
    let mut message = String::new();
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (k, v) in env {
            jail.set_env(k, v);
        }
        if let Some(text) = file {
            jail.create_file("c.toml", text)?;
        }
        message = RawConfig::load(file.map(|_| Path::new("c.toml")))
            .unwrap_err()
            .to_string();
        Ok(())
    });
    message
}

#[test]
fn a_misspelt_variable_is_named_as_written_with_the_nearest_one() {
    let err = load_error(&[("LICENSING_SERIAL_NUMEBR", "X-1")], None);
    assert!(
        err.starts_with("unknown environment variable `LICENSING_SERIAL_NUMEBR`"),
        "{err}"
    );
    assert!(
        err.contains("did you mean `LICENSING_SERIAL_NUMBER`?"),
        "{err}"
    );
    assert!(err.contains("`__`"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A nested key written with a single `_`.
    let err = load_error(&[("LICENSING_AUTH_MODE", "enforce")], None);
    assert!(
        err.contains("did you mean `LICENSING_AUTH__MODE`?"),
        "{err}"
    );
    let err = load_error(&[("LICENSING_TRYOUT__DAIS", "3")], None);
    assert!(
        err.contains("did you mean `LICENSING_TRYOUT__DAYS`?"),
        "{err}"
    );
    // Nothing near: no guess.
    let err = load_error(&[("LICENSING_ZZZZZZZZZZZZ", "1")], None);
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn a_misspelt_file_key_names_the_file_and_the_nearest_key() {
    let err = load_error(&[], Some("serial_numebr = \"X-1\"\n"));
    assert_eq!(
        err,
        "unknown key `serial_numebr` in c.toml: did you mean `serial_number`?"
    );
    let err = load_error(&[], Some("[log]\nlevle = \"debug\"\n"));
    assert!(err.contains("did you mean `log.level`?"), "{err}");
}

#[test]
fn a_top_level_key_after_a_section_says_so() {
    let err = load_error(
        &[],
        Some("[log]\nlevel = \"debug\"\nedition = \"business\"\n"),
    );
    assert!(err.contains("unknown key `log.edition` in c.toml"), "{err}");
    assert!(
        err.contains("top-level keys must come before the first `[section]`"),
        "{err}"
    );
}

#[test]
fn a_type_error_names_the_key_and_the_form() {
    let err = load_error(&[("LICENSING_LISTEN_ADDR", "50051")], None);
    assert!(
        err.starts_with("`listen_addr` must be HOST:PORT, e.g. 0.0.0.0:50051"),
        "{err}"
    );
    assert!(err.contains("LICENSING_LISTEN_ADDR"), "{err}");
    let err = load_error(&[("LICENSING_METRICS_ADDR", "9090")], None);
    assert!(err.starts_with("`metrics_addr` must be HOST:PORT"), "{err}");
    let err = load_error(&[], Some("[tryout]\ndays = \"x\"\n"));
    assert!(
        err.starts_with("`tryout.days` must be a whole number"),
        "{err}"
    );
    assert!(err.contains("c.toml"), "{err}");
}

#[test]
fn a_missing_config_file_is_named() {
    Jail::expect_with(|_| {
        let err = RawConfig::load(Some(Path::new("nope.toml"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read --config nope.toml: No such file or directory"
        );
        Ok(())
    });
}

#[test]
fn a_bad_serial_number_shows_the_value_and_the_character() {
    let raw = RawConfig {
        serial_number: "AB C/1".into(),
        ..RawConfig::default()
    };
    let err = raw.validate_with_anchor(None).unwrap_err().to_string();
    assert!(err.contains("`serial_number`"), "{err}");
    assert!(err.contains("\"AB C/1\""), "{err}");
    assert!(err.contains("' ' (at position 3) is not allowed"), "{err}");
}

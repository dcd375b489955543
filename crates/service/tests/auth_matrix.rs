//! Who may call what, against the real server over real TLS: every RPC of the
//! policy table × every role × {no credentials, wrong token, certificate from
//! another CA, expired certificate, valid token, valid certificate}, each with
//! the code the contract gives it, once with client certificates required at
//! the handshake (`tls.require_client_certificate`, the default) and once with
//! them optional. Also: `auth.mode` from loopback and from a peer in a network
//! namespace of the test's own, and certificate rotation during a stream of
//! calls.

mod common;

use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::pki::{Pem, Pki, tls_channel, tls_channel_lazy};
use common::{TestServer, audited, config, eventually, with_token};
use comtrexx_licensing::auth::Role;
use comtrexx_licensing::auth::callers::{new_token, token_sha256};
use comtrexx_licensing::auth::tls::HANDSHAKE_METHOD;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::SystemClock;
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use comtrexx_licensing::rpc::{RPCS, SERVICE_PREFIX};
use tonic::Code;
use tonic::transport::Channel;

/// One way of calling: a channel (with or without a client certificate) and
/// maybe a bearer token.
struct Credential {
    label: String,
    channel: Channel,
    token: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The server answered with this code.
    Code(Code),
    /// There was no connection to answer on: the TLS handshake refused the
    /// client. (With TLS 1.3 the client learns it on its first read, and the
    /// client library's code for the broken connection varies with timing:
    /// what tells it apart is that the status comes from a transport error,
    /// not from the server.)
    NoConnection,
}

/// Calls `method` of `LicensingService` with an empty request; how it ends.
async fn call(cred: &Credential, method: &str, streaming: bool) -> Outcome {
    let path = format!("{SERVICE_PREFIX}{method}");
    raw_call(
        cred.channel.clone(),
        cred.token.as_deref(),
        &path,
        streaming,
    )
    .await
}

async fn raw_call(channel: Channel, token: Option<&str>, path: &str, streaming: bool) -> Outcome {
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_str(path).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = match grpc.ready().await {
        Err(error) => Err(tonic::Status::from_error(Box::new(error))),
        Ok(()) if streaming => grpc.server_streaming(request, path, codec).await.map(drop),
        Ok(()) => grpc.unary(request, path, codec).await.map(drop),
    };
    match result {
        Ok(()) => Outcome::Code(Code::Ok),
        Err(status) if std::error::Error::source(&status).is_some() => Outcome::NoConnection,
        Err(status) => Outcome::Code(status.code()),
    }
}

fn spiffe(role: Role) -> String {
    format!("spiffe://pbx.test/sa/{}", role.as_str())
}

/// A callers file with a token caller and a certificate caller for every role.
fn callers_file(dir: &std::path::Path, tokens: &[(Role, String)]) -> std::path::PathBuf {
    let mut text = String::new();
    for (role, token) in tokens {
        text += &format!(
            "[[caller]]\nname = \"token-{role}\"\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n\n",
            token_sha256(token)
        );
        text += &format!(
            "[[caller]]\nname = \"cert-{role}\"\nrole = \"{role}\"\ncertificate = \"{}\"\n\n",
            spiffe(*role)
        );
    }
    let path = dir.join("callers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A server with TLS, client CA `trusted`, the callers of `tokens`, and client
/// certificates required at the handshake or optional.
async fn tls_server(
    trusted: &Pki,
    tokens: &[(Role, String)],
    mode: &str,
    require_certificate: bool,
) -> TestServer {
    let (cert, key) = trusted.write_server(&trusted.server("server"));
    let mut raw: RawConfig = config(None, &common::serial("authz"));
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.tls.client_ca_file = Some(trusted.ca_file());
    raw.tls.require_client_certificate = require_certificate;
    raw.auth.mode = mode.into();
    raw.auth.callers_file = Some(callers_file(trusted.dir.path(), tokens));
    TestServer::start(raw).await
}

/// `tls.require_client_certificate = true` (the default with a client CA): a
/// client without a valid certificate is refused at the handshake, so each of
/// its calls fails `UNAVAILABLE` and the refusal is in the audit trail; a
/// token rides on a connection with a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_every_role_every_credential_certificate_required() {
    matrix(true).await;
}

/// `tls.require_client_certificate = false`: a certificate is optional (token
/// callers need none) and a bad one is `UNAUTHENTICATED`, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_every_role_every_credential_certificate_optional() {
    matrix(false).await;
}

async fn matrix(require_certificate: bool) {
    let trusted = Pki::new("trusted CA");
    let other = Pki::new("another CA");
    let tokens: Vec<(Role, String)> = Role::ALL.iter().map(|r| (*r, new_token())).collect();
    let server = tls_server(&trusted, &tokens, "enforce", require_certificate).await;
    let ca = trusted.ca_pem();
    let channel = |client: Option<&Pem>| tls_channel_lazy(server.addr, &ca, client);
    let plain = channel(None);
    // A certificate of this CA whose identity is in no callers-file entry.
    let stranger = channel(Some(
        &trusted.client("spiffe://pbx.test/sa/stranger", false),
    ));
    // What a client without a valid certificate gets: no connection at all, or
    // a call refused by the authorization layer.
    let bad_certificate = if require_certificate {
        Outcome::NoConnection
    } else {
        Outcome::Code(Code::Unauthenticated)
    };
    let unauthenticated = Outcome::Code(Code::Unauthenticated);

    // Credentials that must never get through, whatever the RPC, and the code each gets.
    let refused = vec![
        (
            bad_certificate,
            Credential {
                label: "no credentials".into(),
                channel: plain.clone(),
                token: None,
            },
        ),
        (
            bad_certificate,
            Credential {
                label: "wrong token".into(),
                channel: plain.clone(),
                token: Some(new_token()),
            },
        ),
        (
            unauthenticated,
            Credential {
                label: "wrong token on a connection with a certificate".into(),
                channel: stranger.clone(),
                token: Some(new_token()),
            },
        ),
        (
            bad_certificate,
            Credential {
                label: "certificate from another CA".into(),
                channel: channel(Some(&other.client(&spiffe(Role::Operator), false))),
                token: None,
            },
        ),
        (
            bad_certificate,
            Credential {
                label: "expired certificate".into(),
                channel: channel(Some(&trusted.client(&spiffe(Role::Operator), true))),
                token: None,
            },
        ),
        (
            unauthenticated,
            Credential {
                label: "certificate not in the callers file".into(),
                channel: stranger.clone(),
                token: None,
            },
        ),
    ];
    // Valid credentials of every role: a token and a certificate each. With
    // certificates required, the token goes over a connection with one (the
    // token names the caller).
    let token_channel = if require_certificate {
        stranger.clone()
    } else {
        plain.clone()
    };
    let mut valid = Vec::new();
    for (role, token) in &tokens {
        valid.push((
            *role,
            Credential {
                label: format!("{role} token"),
                channel: token_channel.clone(),
                token: Some(token.clone()),
            },
        ));
        valid.push((
            *role,
            Credential {
                label: format!("{role} certificate"),
                channel: channel(Some(&trusted.client(&spiffe(*role), false))),
                token: None,
            },
        ));
    }

    let mut failures = Vec::new();
    for rule in RPCS {
        let streaming = rule.class.is_none();
        for (expected, cred) in &refused {
            let code = call(cred, rule.name, streaming).await;
            if code != *expected {
                failures.push(format!(
                    "{} with {}: {code:?}, expected {expected:?}",
                    rule.name, cred.label
                ));
            }
        }
        for (role, cred) in &valid {
            let code = call(cred, rule.name, streaming).await;
            let allowed = rule.roles.contains(role);
            let ok = if allowed {
                !matches!(
                    code,
                    Outcome::Code(Code::Unauthenticated | Code::PermissionDenied)
                        | Outcome::NoConnection
                )
            } else {
                code == Outcome::Code(Code::PermissionDenied)
            };
            if !ok {
                failures.push(format!(
                    "{} as {}: {code:?}, expected {}",
                    rule.name,
                    cred.label,
                    if allowed {
                        "to pass"
                    } else {
                        "PermissionDenied"
                    }
                ));
            }
        }
    }
    // Health is open to anyone who gets a connection; reflection to every
    // known caller only.
    let health = "/grpc.health.v1.Health/Check";
    let code = raw_call(plain.clone(), None, health, false).await;
    let expected = if require_certificate {
        Outcome::NoConnection
    } else {
        Outcome::Code(Code::Ok)
    };
    if code != expected {
        failures.push(format!(
            "health without a certificate: {code:?}, expected {expected:?}"
        ));
    }
    let code = raw_call(stranger.clone(), None, health, false).await;
    if code != Outcome::Code(Code::Ok) {
        failures.push(format!("health with an unknown certificate: {code:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    if require_certificate {
        // The handshake refusals are in the audit trail, each saying why.
        let operator = channel(Some(&trusted.client(&spiffe(Role::Operator), false)));
        let client = LicensingServiceClient::new(operator);
        for why in ["no client certificate", "UnknownIssuer", "expired"] {
            let found = audited(&client, 1, |e| {
                e.method == HANDSHAKE_METHOD
                    && e.code == "UNAUTHENTICATED"
                    && e.detail.contains(why)
            })
            .await;
            assert!(
                !found.is_empty(),
                "no handshake refusal saying {why:?} in the audit trail"
            );
        }
        let mut client = client;
        client
            .check_seat(pb::CheckSeatRequest {
                user_id: "alice".into(),
                feature: String::new(),
                ..Default::default()
            })
            .await
            .expect("the operator's connection works");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_mode_trusts_loopback_and_enforce_does_not() {
    let protected = TestServer::start(config(None, &common::serial("prot"))).await;
    let mut client = protected.client().await;
    let overview = client
        .get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .expect("a loopback caller without credentials is an operator")
        .into_inner();
    assert_eq!(overview.auth_mode, "protected");
    assert!(!overview.development_installation);
    client
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .expect("operators may read the audit trail");

    // Enforce needs a callers file (else it refuses to start): one token caller.
    let dir = tempfile::tempdir().unwrap();
    let mut raw = config(None, &common::serial("enf"));
    raw.auth.mode = "enforce".into();
    raw.auth.callers_file = Some(callers_file(dir.path(), &[(Role::Monitoring, new_token())]));
    let enforce = TestServer::start(raw).await;
    let status = enforce
        .client()
        .await
        .get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut raw = config(None, &common::serial("dis"));
    raw.auth.mode = "disabled".into();
    let disabled = TestServer::start(raw).await;
    let overview = disabled
        .client()
        .await
        .get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overview.auth_mode, "disabled");
}

/// A network namespace joined to this one by a veth pair, removed on drop.
/// Traffic stays on the pair: the test's server listens on the host end only.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Self {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let octet = 1 + (rand::random::<u8>() % 250);
        let (name, host_if, ns_if) = (
            format!("cxl-auth-{tag}"),
            format!("cxlh{tag}"),
            format!("cxln{tag}"),
        );
        let host_ip = format!("10.213.{octet}.1");
        let ns_ip = format!("10.213.{octet}.2");
        ip(&["netns", "add", &name]);
        let netns = Self {
            name,
            host_if,
            host_ip,
        };
        ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &netns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", netns.host_ip),
            "dev",
            &netns.host_if,
        ]);
        ip(&["link", "set", &netns.host_if, "up"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        exec(&["link", "set", &ns_if, "up"]);
        exec(&["link", "set", "lo", "up"]);
        netns
    }

    /// Runs `f` on a thread inside the namespace (its sockets are the namespace's).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let file = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// How calls from a peer in a network namespace of the test's own end, on a
/// plaintext server in `protected` mode whose callers file has a monitoring
/// token: (no credentials, the token reading the overview, the token resetting
/// the activation), each `None` for OK or the refusal's (code, reason).
async fn remote_plaintext_calls(allow_plaintext_tokens: bool) -> [Option<(Code, String)>; 3] {
    let netns = Netns::create();
    let token = new_token();
    let dir = tempfile::tempdir().unwrap();
    let mut raw = config(None, &common::serial("remote"));
    raw.auth.callers_file = Some(callers_file(
        dir.path(),
        &[(Role::Monitoring, token.clone())],
    ));
    raw.auth.allow_plaintext_tokens = allow_plaintext_tokens;
    let listener = tokio::net::TcpListener::bind(format!("{}:0", netns.host_ip))
        .await
        .expect("bind the host end of the veth pair");
    let server = TestServer::start_on(raw, Arc::new(SystemClock), listener).await;
    let endpoint = format!("http://{}", server.addr);
    let outcomes = netns
        .run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                use tonic_types::StatusExt as _;
                let outcome = |result: Result<(), tonic::Status>| {
                    result.err().map(|s| {
                        let reason = s
                            .get_details_error_info()
                            .map(|i| i.reason)
                            .unwrap_or_default();
                        (s.code(), reason)
                    })
                };
                let channel = Channel::from_shared(endpoint)
                    .unwrap()
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .expect("connect from the namespace");
                let mut client = LicensingServiceClient::new(channel);
                let anonymous = client
                    .get_license_overview(pb::GetLicenseOverviewRequest::default())
                    .await
                    .map(drop);
                let overview = client
                    .get_license_overview(with_token(
                        pb::GetLicenseOverviewRequest::default(),
                        &token,
                    ))
                    .await
                    .map(drop);
                let reset = client
                    .reset_activation(with_token(pb::ResetActivationRequest {}, &token))
                    .await
                    .map(drop);
                [outcome(anonymous), outcome(overview), outcome(reset)]
            })
        })
        .join()
        .expect("the namespace client");
    server.shutdown().await;
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_mode_refuses_a_remote_token_over_plaintext() {
    let [anonymous, overview, reset] = remote_plaintext_calls(false).await;
    let refused = Some((Code::Unauthenticated, "PLAINTEXT_TOKEN".to_owned()));
    assert_eq!(
        anonymous,
        Some((Code::Unauthenticated, "NO_CREDENTIALS".to_owned())),
        "no credentials"
    );
    assert_eq!(overview, refused, "a token in clear text from another host");
    assert_eq!(reset, refused, "refused before the role is looked at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_mode_asks_a_remote_peer_for_credentials() {
    // Plaintext tokens allowed explicitly (a network protected otherwise).
    let [anonymous, overview, reset] = remote_plaintext_calls(true).await;
    assert_eq!(
        anonymous.map(|o| o.0),
        Some(Code::Unauthenticated),
        "no credentials"
    );
    assert_eq!(overview, None, "a monitoring token may read the overview");
    assert_eq!(
        reset.map(|o| o.0),
        Some(Code::PermissionDenied),
        "but not reset activation"
    );
}

/// The server certificate a fresh TLS connection is shown.
async fn served_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_without_a_failed_call() {
    let pki = Pki::new("rotating CA");
    let first = pki.server("first");
    let (cert, key) = pki.write_server(&first);
    let mut raw = config(None, &common::serial("rotate"));
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.auth.reload_interval_ms = 100;
    let server = TestServer::start(raw).await;
    let ca = pki.ca_pem();
    let addr = server.addr;
    let first_der = served_certificate(addr, &ca).await;

    // A stream of calls on one long-lived connection and on new connections,
    // while the certificate changes under them.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let caller = {
        let (stop, calls, failed, ca) = (stop.clone(), calls.clone(), failed.clone(), ca.clone());
        tokio::spawn(async move {
            let mut long_lived = LicensingServiceClient::new(tls_channel(addr, &ca, None).await);
            while !stop.load(Ordering::Relaxed) {
                let mut fresh = LicensingServiceClient::new(tls_channel(addr, &ca, None).await);
                for client in [&mut long_lived, &mut fresh] {
                    let result = client
                        .check_seat(pb::CheckSeatRequest {
                            user_id: "alice".into(),
                            feature: String::new(),
                            ..Default::default()
                        })
                        .await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    if result.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            calls.load(Ordering::Relaxed) >= 20
        })
        .await
    );
    let second = pki.server("second");
    pki.write_server(&second);
    assert!(
        eventually(Duration::from_secs(10), || async {
            served_certificate(addr, &ca).await != first_der
        })
        .await,
        "the rotated certificate is served to new connections"
    );
    let rotated_at = calls.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async {
            calls.load(Ordering::Relaxed) >= rotated_at + 20
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");

    // A broken file keeps the certificate in force.
    std::fs::write(pki.dir.path().join("tls.crt"), "not a certificate").unwrap();
    let mut client = LicensingServiceClient::new(tls_channel(addr, &ca, None).await);
    client
        .check_seat(pb::CheckSeatRequest {
            user_id: "bob".into(),
            feature: String::new(),
            ..Default::default()
        })
        .await
        .expect("the previous certificate stays in force");
    server.shutdown().await;
}

/// The client CA is re-read like the certificate and key: a CA swapped in
/// (cert-manager rotating the issuer) admits its clients on new connections,
/// without a restart, and the old CA's clients are refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_applies_to_new_connections() {
    let old_ca = Pki::new("old client CA");
    let new_ca = Pki::new("new client CA");
    let tokens: Vec<(Role, String)> = vec![(Role::Monitoring, new_token())];
    let mut raw: RawConfig = config(None, &common::serial("ca-rotate"));
    let (cert, key) = old_ca.write_server(&old_ca.server("server"));
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.tls.client_ca_file = Some(old_ca.ca_file());
    raw.auth.mode = "enforce".into();
    raw.auth.reload_interval_ms = 100;
    raw.auth.callers_file = Some(callers_file(old_ca.dir.path(), &tokens));
    let server = TestServer::start(raw).await;
    let server_ca = old_ca.ca_pem();
    let as_monitoring = |issuer: &Pki| Credential {
        label: "monitoring certificate".into(),
        channel: tls_channel_lazy(
            server.addr,
            &server_ca,
            Some(&issuer.client(&spiffe(Role::Monitoring), false)),
        ),
        token: None,
    };
    assert_eq!(
        call(&as_monitoring(&old_ca), "GetTryoutStatus", false).await,
        Outcome::Code(Code::Ok)
    );
    assert_eq!(
        call(&as_monitoring(&new_ca), "GetTryoutStatus", false).await,
        Outcome::NoConnection
    );
    // The client CA file now holds the new CA (written atomically, as a
    // Secret volume changes).
    let tmp = old_ca.dir.path().join("ca.pem.tmp");
    std::fs::write(&tmp, new_ca.ca_pem()).unwrap();
    std::fs::rename(&tmp, old_ca.dir.path().join("ca.pem")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            call(&as_monitoring(&new_ca), "GetTryoutStatus", false).await == Outcome::Code(Code::Ok)
        })
        .await,
        "a client of the new CA is admitted"
    );
    assert_eq!(
        call(&as_monitoring(&old_ca), "GetTryoutStatus", false).await,
        Outcome::NoConnection,
        "a client of the old CA is refused on a new connection"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_file_changes_apply_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token();
    let mut raw = config(None, &common::serial("recall"));
    raw.auth.mode = "enforce".into();
    raw.auth.reload_interval_ms = 100;
    raw.auth.callers_file = Some(callers_file(dir.path(), &[]));
    // Starting without callers is meant here (they come later).
    raw.auth.allow_empty_callers_file = true;
    let server = TestServer::start(raw).await;
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cred = Credential {
        label: "new token".into(),
        channel,
        token: Some(token.clone()),
    };
    assert_eq!(
        call(&cred, "GetTryoutStatus", false).await,
        Outcome::Code(Code::Unauthenticated)
    );
    callers_file(dir.path(), &[(Role::Monitoring, token)]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            call(&cred, "GetTryoutStatus", false).await == Outcome::Code(Code::Ok)
        })
        .await,
        "the new caller is admitted once the file changes"
    );
    assert_eq!(
        call(&cred, "AssignSeat", false).await,
        Outcome::Code(Code::PermissionDenied)
    );
    server.shutdown().await;
}

#[test]
fn pem_of_a_test_certificate_names_its_identity() {
    // The caller name is the URI SAN of a certificate.
    let pki = Pki::new("ca");
    let Pem { cert, .. } = pki.client("spiffe://pbx.test/sa/x", false);
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(
        comtrexx_licensing::auth::tls::certificate_identity(&der).as_deref(),
        Some("spiffe://pbx.test/sa/x")
    );
}

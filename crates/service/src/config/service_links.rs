//! Kubernetes service-link variables (`LICENSING_*_SERVICE_HOST`, ...), which are
//! not settings and are ignored.

use super::RawConfig;

/// The top-level keys of the configuration (a service-link-shaped name that is one
/// of them stays a setting).
fn known_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| match serde_json::to_value(RawConfig::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    })
}

/// Whether `key` (a `LICENSING_` variable without its prefix, any case) is not a
/// setting but one of the variables Kubernetes injects for a Service whose name
/// starts with `licensing` (service links): `<SVC>_SERVICE_HOST`,
/// `<SVC>_SERVICE_PORT[_<PORT-NAME>]`, `<SVC>_PORT` and
/// `<SVC>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`.
pub fn is_service_link(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.contains("__") || known_keys().contains(&key) {
        return false;
    }
    // `<SVC>` may be empty: a Service named just `licensing` gives
    // LICENSING_SERVICE_HOST, LICENSING_PORT, ...
    let svc_ok = |svc: &str| svc.is_empty() || !svc.starts_with('_') && !svc.ends_with('_');
    if let Some(svc) = key.strip_suffix("service_host") {
        return svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok);
    }
    if let Some((svc, rest)) = key.split_once("service_port")
        && (svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok))
    {
        return rest.is_empty() || rest.len() > 1 && rest.starts_with('_');
    }
    if let Some(svc) = key.strip_suffix("port")
        && (svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok))
    {
        return true;
    }
    // <SVC>_PORT_<n>_<PROTO>[_<FIELD>]
    let parts: Vec<&str> = key.split('_').collect();
    parts.iter().enumerate().any(|(i, part)| {
        *part == "port"
            && parts
                .get(i + 1)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && parts
                .get(i + 2)
                .is_some_and(|p| matches!(*p, "tcp" | "udp" | "sctp"))
            && match parts.len() - i {
                3 => true,
                4 => matches!(parts[i + 3], "proto" | "port" | "addr"),
                _ => false,
            }
    })
}

/// The `LICENSING_*` variables of this process that are ignored as service links.
pub fn ignored_service_links() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.strip_prefix("LICENSING_").is_some_and(is_service_link))
        .collect()
}

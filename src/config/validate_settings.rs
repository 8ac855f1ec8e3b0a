//! Validation of the process settings: `server:` (listeners, tokens,
//! `server.tls`, `server.limits`), `store:`, `cache:` and `identity:`, one
//! function per section, each returning the first rule broken.
//!
//! May use [`super::schema`], [`super::settings`], [`super::secrets`], the
//! shared rules in [`super::validate`] and `identity` (the source types).

use std::net::SocketAddr;
use std::time::Duration;

use super::schema::{self, ApiKey, Identity};
use super::secrets::{self, MIN_TOKEN_CHARS, Merged, PLACEHOLDER_TOKEN};
use super::settings::{
    Backend, CacheConfig, Counting, LeaseConfig, Limits, ServerConfig, StoreConfig, StoreUrl, TlsConfig, TracingConfig,
};
use super::validate::{Invalid, bounded, invalid, positive};
use crate::identity::IdentitySource;

/// `server:`. Its parts are checked in this order: listeners, admin tokens,
/// service tokens, `server.tls`, `server.limits`.
pub(super) fn server(raw: &schema::Server) -> Result<ServerConfig, Invalid> {
    let grpc_listen = listen(&raw.grpc_listen, "0.0.0.0:9191", "server.grpc_listen")?;
    let http_listen = listen(&raw.http_listen, "0.0.0.0:9090", "server.http_listen")?;
    let admin =
        tokens(&raw.admin_tokens, raw.admin_tokens_env.as_deref(), "TOLLGATE_ADMIN_TOKENS", "server.admin_tokens")?;
    let service = tokens(
        &raw.service_tokens,
        raw.service_tokens_env.as_deref(),
        "TOLLGATE_SERVICE_TOKENS",
        "server.service_tokens",
    )?;
    let tls = raw.tls.as_ref().map(tls).transpose()?;
    let limits = limits(&raw.limits)?;
    let authz_http_listen = match &raw.authz_http_listen {
        Some(_) => Some(listen(&raw.authz_http_listen, "", "server.authz_http_listen")?),
        None => None,
    };
    Ok(ServerConfig {
        grpc_listen,
        http_listen,
        authz_http_listen,
        admin_tokens_env: admin.env,
        admin_tokens: admin.secrets,
        service_tokens_env: service.env,
        service_tokens: service.secrets,
        read_access: raw.read_access,
        trusted_callers: raw.trusted_callers,
        dynamic_metadata: raw.dynamic_metadata,
        remove_own_headers: raw.remove_own_headers,
        tls,
        watch_config: raw.watch_config,
        reflection: raw.reflection.unwrap_or(true),
        drain_delay: raw.drain_delay.unwrap_or(Duration::ZERO),
        drain_timeout: raw.drain_timeout.unwrap_or(Duration::from_secs(30)),
        limits,
    })
}

fn listen(value: &Option<String>, default: &str, path: &str) -> Result<SocketAddr, Invalid> {
    let s = value.as_deref().unwrap_or(default);
    s.parse().map_err(|_| invalid(path, format!("{s:?} is not a socket address (want e.g. 0.0.0.0:9191)")))
}

/// The tokens of `listed` plus those in environment variable `env` (or
/// `default_env`), merged by [`secrets::merge`]; each must be long and not the
/// documented placeholder. An error names the place, never the token.
fn tokens(listed: &[String], env: Option<&str>, default_env: &str, path: &str) -> Result<Merged, Invalid> {
    let all = secrets::merge(listed, env, default_env);
    for (i, t) in all.secrets.0.iter().enumerate() {
        let place =
            if i < all.from_env { format!("{} (environment), token {}", all.env, i + 1) } else { path.to_owned() };
        if t == PLACEHOLDER_TOKEN {
            return Err(invalid(place, "is the documented placeholder; generate one (openssl rand -hex 32)"));
        }
        if t.chars().count() < MIN_TOKEN_CHARS {
            return Err(invalid(place, format!("tokens must be at least {MIN_TOKEN_CHARS} characters")));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(place, "tokens must be visible ASCII without spaces"));
        }
    }
    Ok(all)
}

/// `server.tls`: the PEM files, read now so a missing one fails before binding.
fn tls(raw: &schema::Tls) -> Result<TlsConfig, Invalid> {
    Ok(TlsConfig {
        cert: pem(&raw.cert, "server.tls.cert")?,
        key: pem(&raw.key, "server.tls.key")?,
        client_ca: raw.client_ca.as_deref().map(|c| pem(c, "server.tls.client_ca")).transpose()?,
    })
}

fn pem(path: &str, field: &str) -> Result<Vec<u8>, Invalid> {
    let bytes = std::fs::read(path).map_err(|e| invalid(field, format!("cannot read {path:?}: {e}")))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(invalid(field, format!("{path:?} is not a PEM file")));
    }
    Ok(bytes)
}

/// `server.limits`: each bound defaults to [`Limits::default`] and lies in a fixed range.
fn limits(raw: &schema::LimitsDef) -> Result<Limits, Invalid> {
    let d = Limits::default();
    let p = |f: &str| format!("server.limits.{f}");
    let (ms, hour) = (Duration::from_millis(1), Duration::from_secs(3600));
    Ok(Limits {
        max_concurrent_streams: bounded(
            raw.max_concurrent_streams,
            d.max_concurrent_streams,
            1,
            65_536,
            &p("max_concurrent_streams"),
        )?,
        max_message_bytes: bounded(
            raw.max_message_bytes,
            d.max_message_bytes,
            1024,
            16 << 20,
            &p("max_message_bytes"),
        )?,
        max_header_list_bytes: bounded(
            raw.max_header_list_bytes,
            d.max_header_list_bytes,
            1024,
            1 << 20,
            &p("max_header_list_bytes"),
        )?,
        max_connections: bounded(raw.max_connections, d.max_connections, 1, 1 << 20, &p("max_connections"))?,
        handshake_timeout: bounded(raw.handshake_timeout, d.handshake_timeout, ms, hour, &p("handshake_timeout"))?,
        request_timeout: bounded(raw.request_timeout, d.request_timeout, ms, hour, &p("request_timeout"))?,
        keepalive_interval: bounded(
            raw.keepalive_interval,
            d.keepalive_interval,
            Duration::from_secs(1),
            hour,
            &p("keepalive_interval"),
        )?,
        keepalive_timeout: bounded(raw.keepalive_timeout, d.keepalive_timeout, ms, hour, &p("keepalive_timeout"))?,
        max_connection_age: bounded(
            raw.max_connection_age,
            d.max_connection_age,
            Duration::from_secs(1),
            Duration::from_secs(7 * 24 * 3600),
            &p("max_connection_age"),
        )?,
        max_body_bytes: bounded(raw.max_body_bytes, d.max_body_bytes, 1024, 64 << 20, &p("max_body_bytes"))?,
        max_inflight_requests: bounded(
            raw.max_inflight_requests,
            d.max_inflight_requests,
            1,
            1 << 20,
            &p("max_inflight_requests"),
        )?,
    })
}

/// `store:`: a Redis backend needs a Redis URL.
pub(super) fn store(raw: schema::Store) -> Result<StoreConfig, Invalid> {
    let url = raw.url.unwrap_or_default();
    if raw.backend == Backend::Redis {
        if url.is_empty() {
            return Err(invalid("store.url", "required when store.backend is redis"));
        }
        let scheme = url.split("://").next().unwrap_or("");
        if !["redis", "rediss", "redis+cluster", "rediss+cluster"].contains(&scheme) || !url.contains("://") {
            return Err(invalid(
                "store.url",
                "must start with redis://, rediss://, redis+cluster:// or rediss+cluster://",
            ));
        }
    }
    if raw.counting == Counting::Lease && raw.backend != Backend::Redis {
        return Err(invalid(
            "store.counting",
            "lease needs store.backend: redis (one process has nothing to lease from)",
        ));
    }
    Ok(StoreConfig {
        backend: raw.backend,
        url: StoreUrl(url),
        on_error: raw.on_error,
        timeout: positive(raw.timeout.unwrap_or(Duration::from_millis(50)), "store.timeout")?,
        key_prefix: raw.key_prefix.unwrap_or_else(|| "tollgate:".into()),
        counting: raw.counting,
        lease: lease(&raw.lease)?,
    })
}

/// `store.lease:`: bounded so a typo cannot lease a whole quota to one replica
/// or hold leases for hours.
fn lease(raw: &schema::Lease) -> Result<LeaseConfig, Invalid> {
    let d = LeaseConfig::default();
    let config = LeaseConfig {
        max_block: bounded(raw.max_block, d.max_block, 1, 1_000_000, "store.lease.max_block")?,
        replicas: bounded(raw.replicas, d.replicas, 1, 10_000, "store.lease.replicas")?,
        idle: bounded(raw.idle, d.idle, Duration::from_millis(100), Duration::from_secs(60), "store.lease.idle")?,
        max_accounts: bounded(raw.max_accounts, d.max_accounts, 1, 10_000_000, "store.lease.max_accounts")?,
        lifetime: bounded(
            raw.lifetime,
            d.lifetime,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            "store.lease.lifetime",
        )?,
    };
    // The idle sweep (every idle / 2) gives a lease back while its record
    // lives: by renew_at (lifetime / 2) + idle / 2 + idle < 9/10 of it.
    if config.idle > config.lifetime / 4 {
        return Err(invalid("store.lease.idle", "must be at most a quarter of store.lease.lifetime"));
    }
    Ok(config)
}

/// `cache:`.
pub(super) fn cache(raw: &schema::Cache) -> Result<CacheConfig, Invalid> {
    Ok(CacheConfig {
        ttl: raw.ttl.unwrap_or(Duration::from_secs(30)),
        negative_ttl: raw.negative_ttl.unwrap_or(Duration::from_secs(5)),
        max_bytes: bounded(raw.max_bytes, 64 << 20, 1 << 20, 1 << 40, "cache.max_bytes")?,
    })
}

/// `identity:`: each entry exactly one source; when the section is absent,
/// `x-api-key` then `authorization: Bearer`.
pub(super) fn identity(raw: Option<Vec<Identity>>) -> Result<Vec<IdentitySource>, Invalid> {
    let defs = raw.unwrap_or_else(|| {
        vec![
            Identity { api_key: Some(ApiKey { header: "x-api-key".into(), scheme: None }), ..Default::default() },
            Identity {
                api_key: Some(ApiKey { header: "authorization".into(), scheme: Some("Bearer".into()) }),
                ..Default::default()
            },
        ]
    });
    let mut identity = Vec::with_capacity(defs.len());
    for (i, def) in defs.into_iter().enumerate() {
        let p = format!("identity[{i}]");
        identity.push(match (def.api_key, def.jwt_claim, def.trusted_header) {
            (Some(a), None, None) => {
                if let Some(s) = &a.scheme
                    && (s.trim().is_empty() || s.contains(' '))
                {
                    return Err(invalid(format!("{p}.api_key.scheme"), "must be one word, e.g. Bearer"));
                }
                IdentitySource::ApiKey {
                    header: header_name(&a.header, &format!("{p}.api_key.header"))?.into(),
                    scheme: a.scheme,
                }
            }
            (None, Some(j), None) => {
                for (name, v) in [("namespace", &j.namespace), ("field", &j.field), ("claim", &j.claim)] {
                    if v.trim().is_empty() {
                        return Err(invalid(format!("{p}.jwt_claim.{name}"), "must not be empty"));
                    }
                }
                IdentitySource::JwtClaim { namespace: j.namespace, field: j.field, claim: j.claim }
            }
            (None, None, Some(t)) => IdentitySource::TrustedHeader {
                header: header_name(&t.header, &format!("{p}.trusted_header.header"))?.into(),
            },
            _ => return Err(invalid(p, "needs exactly one of api_key, jwt_claim, trusted_header")),
        });
    }
    Ok(identity)
}

fn header_name(h: &str, path: &str) -> Result<String, Invalid> {
    let h = h.trim().to_ascii_lowercase();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if h.is_empty() || !h.bytes().all(token) {
        return Err(invalid(path, format!("{h:?} is not a valid HTTP header name")));
    }
    Ok(h)
}

/// `tracing:`: an http(s) endpoint, a ratio in 0..=1, a bounded queue and timeout.
pub(super) fn tracing(raw: schema::Tracing) -> Result<TracingConfig, Invalid> {
    if let Some(e) = &raw.otlp_endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(invalid("tracing.otlp_endpoint", "must be an http:// or https:// URL (OTLP/gRPC)"));
    }
    if let Some(r) = raw.sample_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return Err(invalid("tracing.sample_ratio", format!("must be between 0 and 1, got {r}")));
    }
    let service_name = raw.service_name.unwrap_or_else(|| "tollgate".into());
    if service_name.is_empty() || service_name.len() > 128 || service_name.chars().any(char::is_control) {
        return Err(invalid("tracing.service_name", "must be 1-128 characters without control characters"));
    }
    Ok(TracingConfig {
        otlp_endpoint: raw.otlp_endpoint,
        sample_ratio: raw.sample_ratio,
        service_name,
        queue_size: bounded(raw.queue_size, 2048, 1, 1 << 20, "tracing.queue_size")?,
        export_timeout: bounded(
            raw.export_timeout,
            Duration::from_secs(5),
            Duration::from_millis(100),
            Duration::from_secs(60),
            "tracing.export_timeout",
        )?,
    })
}

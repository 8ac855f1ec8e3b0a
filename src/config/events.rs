//! `events:`: where usage and threshold events go (an HTTP sink taking
//! CloudEvents batches), how big the outbox may grow, and the thresholds.
//!
//! Secrets (the sink's bearer token, the signing secret) come only from the
//! environment variables the YAML names, read at (re)load; they never print.
//! May use [`super::secrets`] and [`super::validate`]'s field rules.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::schema;
use super::validate::{Invalid, bounded, invalid};

/// A secret read from the environment; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `events.sink`: the HTTP endpoint events are POSTed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// `http://` or `https://` URL (`events.sink.url`).
    pub url: String,
    /// The bearer token (`Authorization: Bearer …`), from `token_env`.
    pub token: Option<Secret>,
    /// The HMAC-SHA256 key of the `Tollgate-Signature` header, from `signing_secret_env`.
    pub signing_secret: Option<Secret>,
    /// Most events per POST.
    pub batch: usize,
    /// How long one POST may take.
    pub timeout: Duration,
}

/// Threshold levels: fractions of each calendar quota, and a credit level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Levels {
    /// Fractions in thousandths (0.8 → 800), ascending, each in 1..=1000.
    pub quota: Vec<u16>,
    /// A credit balance at or below this is "low".
    pub credits_below: Option<u64>,
}

/// `events:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Where events go; `None`: no events are made.
    pub sink: Option<SinkConfig>,
    /// The CloudEvents `source` of every event.
    pub source: String,
    /// Most events waiting per account (Redis) or in all (memory); events
    /// beyond it are dropped and counted.
    pub outbox_limit: u64,
    /// How long an event claimed by a replica may stay undelivered before
    /// another replica takes it over (its claimer is presumed dead).
    pub reclaim_after: Duration,
    /// Levels for every plan without its own.
    pub thresholds: Levels,
    /// Levels per plan, replacing the global ones.
    pub plan_thresholds: HashMap<String, Levels>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            sink: None,
            source: "tollgate".to_owned(),
            outbox_limit: 100_000,
            reclaim_after: Duration::from_secs(30),
            thresholds: Levels::default(),
            plan_thresholds: HashMap::new(),
        }
    }
}

impl EventsConfig {
    /// Whether events are made at all.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Whether any plan has a threshold level (else no account is looked up for them).
    pub fn levels_for_any(&self) -> bool {
        let any = |l: &Levels| !l.quota.is_empty() || l.credits_below.is_some();
        any(&self.thresholds) || self.plan_thresholds.values().any(any)
    }

    /// The levels that apply to `plan`.
    pub fn levels(&self, plan: &str) -> &Levels {
        self.plan_thresholds.get(plan).unwrap_or(&self.thresholds)
    }
}

/// Reads a secret from `var`; an unset or empty variable is an error naming `path`.
fn secret(var: &str, path: &str) -> Result<Secret, Invalid> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
        _ => Err(invalid(path, format!("environment variable {var} is not set"))),
    }
}

fn levels(raw: &schema::Levels, path: &str) -> Result<Levels, Invalid> {
    let mut quota = Vec::with_capacity(raw.quota.len());
    for (i, f) in raw.quota.iter().enumerate() {
        let permille = (f * 1000.0).round();
        if !(f.is_finite() && *f > 0.0 && *f <= 1.0) || (permille / 1000.0 - f).abs() > 1e-9 {
            return Err(invalid(
                format!("{path}.quota[{i}]"),
                format!("{f} is not a fraction in (0, 1] with at most 3 decimals"),
            ));
        }
        quota.push(permille as u16);
    }
    if quota.len() > 10 {
        return Err(invalid(format!("{path}.quota"), "at most 10 levels"));
    }
    quota.sort_unstable();
    quota.dedup();
    let credits_below = match raw.credits_below {
        Some(c) if !(0..=crate::usage::MAX_CREDITS as i64).contains(&c) => {
            return Err(invalid(
                format!("{path}.credits_below"),
                format!("must be between 0 and {}", crate::usage::MAX_CREDITS),
            ));
        }
        c => c.map(|c| c as u64),
    };
    Ok(Levels { quota, credits_below })
}

/// `events:` checked: an http(s) URL, secrets present, bounds, known plans.
pub(super) fn validate(raw: schema::Events, plans: &crate::decision::Plans) -> Result<EventsConfig, Invalid> {
    let d = EventsConfig::default();
    let source = raw.source.unwrap_or(d.source);
    if source.is_empty() || source.len() > 256 || source.chars().any(char::is_control) {
        return Err(invalid("events.source", "must be 1-256 bytes without control characters"));
    }
    let outbox_limit = bounded(raw.outbox_limit, d.outbox_limit, 100, 10_000_000, "events.outbox_limit")?;
    let reclaim_after = bounded(
        raw.reclaim_after,
        d.reclaim_after,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "events.reclaim_after",
    )?;
    let sink = match raw.sink {
        None => None,
        Some(s) => {
            let url = s.url.ok_or_else(|| invalid("events.sink.url", "is required"))?;
            super::validate::http_url(&url, "events.sink.url")?;
            let token = s.token_env.as_deref().map(|v| secret(v, "events.sink.token_env")).transpose()?;
            let signing_secret =
                s.signing_secret_env.as_deref().map(|v| secret(v, "events.sink.signing_secret_env")).transpose()?;
            if signing_secret.as_ref().is_some_and(|s| s.0.len() < super::MIN_TOKEN_CHARS) {
                return Err(invalid(
                    "events.sink.signing_secret_env",
                    format!("the secret must be at least {} characters", super::MIN_TOKEN_CHARS),
                ));
            }
            let batch = bounded(s.batch, 100, 1, 1000, "events.sink.batch")?;
            let timeout = bounded(
                s.timeout,
                Duration::from_secs(5),
                Duration::from_millis(100),
                Duration::from_secs(60),
                "events.sink.timeout",
            )?;
            Some(SinkConfig { url, token, signing_secret, batch, timeout })
        }
    };
    let thresholds = levels(&raw.thresholds, "events.thresholds")?;
    let mut plan_thresholds = HashMap::new();
    for (plan, l) in &raw.thresholds.plans {
        let path = format!("events.thresholds.plans.{plan}");
        if !l.plans.is_empty() {
            return Err(invalid(format!("{path}.plans"), "plan levels cannot name plans"));
        }
        if !plans.contains_key(plan) {
            return Err(invalid(path, super::validate::unknown("plan", plan, plans.keys())));
        }
        plan_thresholds.insert(plan.clone(), levels(l, &path)?);
    }
    Ok(EventsConfig { sink, source, outbox_limit, reclaim_after, thresholds, plan_thresholds })
}

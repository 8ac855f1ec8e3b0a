//! Secrets that must never print (admin and service tokens, Stripe webhook
//! signing secrets), and the one way each secret-bearing section reads them:
//! the comma-separated values of an environment variable first, then those
//! listed in YAML ([`merge`]).
//!
//! Uses nothing of ours: the sections that own a secret list (`server`,
//! `billing.stripe`) call [`merge`] and add their own rules.

use std::fmt;

/// Secrets that must never print: admin tokens, webhook signing secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub Vec<String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0.len())
    }
}

impl Secrets {
    /// The comma-separated values of environment variable `var` (none when unset).
    pub fn from_env(var: &str) -> Self {
        let raw = std::env::var(var).unwrap_or_default();
        Self(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }
}

/// The placeholder admin token once shipped in `deploy/k8s`; refused at load.
pub const PLACEHOLDER_TOKEN: &str = "change-me-to-a-long-random-token";

/// The shortest admin or service token accepted: 32 characters (e.g. `openssl rand -hex 32` gives 64).
pub const MIN_TOKEN_CHARS: usize = 32;

/// A section's secrets as read at (re)load, with where they came from.
pub(super) struct Merged {
    /// The environment variable read: the section's `*_env` key, or its default.
    pub env: String,
    /// The values of `env` first, then the listed ones.
    pub secrets: Secrets,
    /// How many of `secrets` (the first ones) came from `env`, so an error can
    /// name the variable and position instead of echoing the value.
    pub from_env: usize,
}

/// `listed` (a YAML list) merged with the comma-separated values of the
/// environment variable named by `env` (the section's `*_env` key), or
/// `default_env` when the key is absent. The environment's values come first;
/// every value is trimmed and empty ones are dropped.
pub(super) fn merge(listed: &[String], env: Option<&str>, default_env: &str) -> Merged {
    let env = env.unwrap_or(default_env).to_owned();
    let mut secrets = Secrets::from_env(&env);
    let from_env = secrets.0.len();
    secrets.0.extend(listed.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()));
    Merged { env, secrets, from_env }
}

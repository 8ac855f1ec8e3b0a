//! Stripe webhooks: any body and `Stripe-Signature` through `stripe::handle`
//! (signature, event parsing, de-duplication, account changes) over a memory
//! store seeded with the demo accounts, and through the pure parts
//! (`verify`, `Event` parsing, `apply`).
//!
//! Input layout: the first byte chooses.
//! - bit 0 clear: the rest is the body, and the target signs it with the
//!   configured secret at the current second, so the event parser is reached;
//! - bit 0 set: the rest is `signature '\n' body` (no `'\n'`: no header), both
//!   arbitrary, so the header parser is fuzzed.
//!
//! Bit 1 picks `account_from` (`customer` or `metadata:account_id`).
//!
//! Invariants (a panic is a counterexample): nothing panics; a body the
//! target signed is never refused for its signature; the memory store never
//! fails, so no outcome is `Unavailable`.
//!
//! Each input gets a fresh store, so an input's outcome does not depend on the
//! ones before it (event ids are remembered for days).

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use tollgate::accounts::Accounts;
use tollgate::authorizer::Authorizer;
use tollgate::config::{Config, DEMO_CONFIG, Secrets, StripeConfig};
use tollgate::entitlement::Account;
use tollgate::metrics::Metrics;
use tollgate::store::{MemoryStore, Store};
use tollgate::stripe::{self, Event, Outcome};

const SECRET: &str = "whsec_fuzz_secret";

struct Harness {
    runtime: Runtime,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    by_customer: StripeConfig,
    by_metadata: StripeConfig,
    secrets: Vec<String>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn stripe_config(account_from: &str) -> StripeConfig {
    StripeConfig {
        webhook_secrets_env: "TOLLGATE_FUZZ_UNSET".into(),
        webhook_secrets: Secrets(vec![SECRET.into()]),
        tolerance: Duration::from_secs(300),
        account_from: account_from.into(),
        prices: [("price_pro".to_string(), "pro".to_string()), ("price_free".to_string(), "free".to_string())].into(),
        features: [("ai-access".to_string(), "ai".to_string())].into(),
    }
}

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| Harness {
        runtime: tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime"),
        config: Arc::new(Config::parse(DEMO_CONFIG, "demo.yaml").expect("the demo config parses")),
        metrics: Arc::new(Metrics::new()),
        by_customer: stripe_config("customer"),
        by_metadata: stripe_config("metadata:account_id"),
        secrets: vec![SECRET.into()],
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness();
    let config = if mode & 2 == 0 { &h.by_customer } else { &h.by_metadata };
    let now = chrono::Utc::now().timestamp();

    let signed = mode & 1 == 0;
    let (signature, body): (Option<String>, &[u8]) = if signed {
        (Some(stripe::sign(rest, SECRET, now)), rest)
    } else {
        match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (Some(String::from_utf8_lossy(&rest[..i]).into_owned()), &rest[i + 1..]),
            None => (None, rest),
        }
    };

    // The pure parts, as the HTTP layer and tests call them.
    let _ = stripe::verify(signature.as_deref().unwrap_or(""), body, &h.secrets, config.tolerance, now);
    if let Ok(event) = serde_json::from_slice::<Event>(body) {
        let _ = (event.created_at(), event.customer(), event.metadata("account_id"));
        let account = Account { id: "acct_fuzz".into(), plan: "free".into(), ..Account::default() };
        let _ = stripe::apply(&event, &account, config);
    }

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let outcome = h.runtime.block_on(async {
        Accounts::seed(store.as_ref(), &h.config.accounts, &h.config.policy.plans)
            .await
            .expect("the memory store seeds");
        let accounts = Accounts::new(Arc::new(Authorizer::new(h.config.clone(), store, h.metrics.clone())));
        stripe::handle(&accounts, config, &h.secrets, signature.as_deref(), body).await
    });
    if signed {
        assert_ne!(outcome, Outcome::Rejected("invalid signature".into()), "a body signed with the secret was refused");
    }
    assert_ne!(outcome, Outcome::Unavailable, "the memory store never fails");
});

use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::bounds::MAX_ITEMS;
use crate::config::DEMO_CONFIG;
use crate::entitlement::{MAX_LIMIT, MAX_WINDOW, Window};
use crate::metrics::Metrics;
use crate::store::MemoryStore;
use crate::store::Reply;
use crate::usage::SpendAnswer;

fn demo() -> Config {
    let mut config = Config::parse(DEMO_CONFIG, "demo.yaml").expect("the demo config parses");
    config.store.timeout = Duration::from_millis(20);
    config
}

fn service_over(store: Arc<dyn Store>) -> (Accounts, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let authorizer = Authorizer::new(Arc::new(demo()), store, metrics.clone());
    (Accounts::new(Arc::new(authorizer)), metrics)
}

/// The service over a memory store seeded with the demo accounts.
async fn seeded() -> (Accounts, Arc<dyn Store>, Arc<Metrics>) {
    let config = demo();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    assert_eq!(Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans).await.unwrap(), 6);
    let (accounts, metrics) = service_over(store.clone());
    (accounts, store, metrics)
}

fn edit(id: &str, plan: &str) -> EntitlementEdit {
    EntitlementEdit { account_id: id.into(), plan: plan.into(), ..EntitlementEdit::default() }
}

fn quota(meter: &str, limit: u64, period: &str, per: Option<Duration>) -> QuotaEdit {
    QuotaEdit { meter: meter.into(), limit, period: period.into(), per, ..QuotaEdit::default() }
}

/// The message a refusal of `put` gives under the API's `entitlement` root.
async fn refusal(accounts: &Accounts, e: EntitlementEdit) -> String {
    match accounts.put(e).await.map_err(|e| e.under("entitlement")) {
        Err(AccountsError::Invalid(i)) => i.to_string(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn put_refuses_each_bad_field_by_name_and_changes_nothing() {
    let (accounts, store, _) = seeded().await;
    let before = store.account("acct_pro").await.unwrap();
    let base = || edit("acct_pro", "pro");
    let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    let cases: Vec<(EntitlementEdit, &str)> = vec![
        (edit("", "pro"), "entitlement.account_id: must be 1-128 of A-Z a-z 0-9 _ - . : @"),
        (edit("acct{1}", "pro"), "entitlement.account_id: must be"),
        (edit("acct_pro", "gold"), "entitlement.plan: unknown plan \"gold\" (known: free, payg, pro)"),
        (EntitlementEdit { status: "late".into(), ..base() }, "entitlement.status: active|trialing|past_due"),
        (
            EntitlementEdit { status: "past_due".into(), ..base() },
            "entitlement.past_due_since: required when status is past_due",
        ),
        (
            EntitlementEdit { past_due_since: Some(DateTime::<Utc>::MAX_UTC), ..base() },
            "entitlement.past_due_since: must be between 1970-01-01 and 9999-12-31",
        ),
        (
            EntitlementEdit { expires_at: Some(t("1969-12-31T23:59:59Z")), ..base() },
            "entitlement.expires_at: must be between 1970-01-01 and 9999-12-31",
        ),
        (EntitlementEdit { stripe_customer: "cus {1}".into(), ..base() }, "entitlement.stripe_customer: 1-255 of"),
        (
            EntitlementEdit { extra_features: vec!["f".into(); MAX_ITEMS + 1], ..base() },
            "entitlement: at most 256 extra_features and 256 quota_overrides",
        ),
        (
            EntitlementEdit { extra_features: vec!["ok".into(), "a\tb".into()], ..base() },
            "entitlement.extra_features[1]: must be 1-128 bytes without control characters",
        ),
    ];
    for (e, want) in cases {
        let got = refusal(&accounts, e).await;
        assert!(got.starts_with(want), "{got:?} does not start with {want:?}");
    }
    assert_eq!(store.account("acct_pro").await.unwrap(), before, "nothing was written");
}

#[tokio::test]
async fn abusive_quota_overrides_are_refused_by_the_quota_constructor() {
    let (accounts, _, _) = seeded().await;
    let over = |q: Vec<QuotaEdit>| EntitlementEdit { quota_overrides: q, ..edit("acct_pro", "pro") };
    let day = |limit| quota("requests", limit, "day", None);
    let cases = [
        (over(vec![day(0)]), format!("entitlement.quota_overrides[0].limit: must be between 1 and {MAX_LIMIT}, got 0")),
        (
            over(vec![day(MAX_LIMIT + 1)]),
            format!("entitlement.quota_overrides[0].limit: must be between 1 and {MAX_LIMIT}, got {}", MAX_LIMIT + 1),
        ),
        (
            over(vec![day(1), quota("", 1, "day", None)]),
            "entitlement.quota_overrides[1].meter: must not be empty".into(),
        ),
        (
            over(vec![quota(&"m".repeat(129), 1, "day", None)]),
            "entitlement.quota_overrides[0].meter: must be 1-128 bytes without control characters".into(),
        ),
        (
            over(vec![quota("requests", 1, "", Some(MAX_WINDOW + Duration::from_secs(1)))]),
            "entitlement.quota_overrides[0].per: must be at most 366d".into(),
        ),
        (
            over(vec![quota("requests", 1, "", Some(Duration::ZERO))]),
            "entitlement.quota_overrides[0].per: must be at least 1ms".into(),
        ),
        (
            over(vec![quota("requests", 1, "day", Some(Duration::from_secs(1)))]),
            "entitlement.quota_overrides[0]: set either period (a paid allowance) or per (a rate limit), not both"
                .into(),
        ),
        (
            over(vec![quota("requests", 1, "", None)]),
            "entitlement.quota_overrides[0]: needs period (minute|hour|day|month) or per (a duration)".into(),
        ),
        (
            over(vec![quota("requests", 1, "week", None)]),
            "entitlement.quota_overrides[0].period: minute|hour|day|month, or set per".into(),
        ),
        (over(vec![day(5), day(6)]), "entitlement.quota_overrides[1]: duplicate quota requests-day".into()),
    ];
    for (e, want) in cases {
        assert_eq!(refusal(&accounts, e).await, want);
    }
}

#[tokio::test]
async fn put_writes_the_entitlement_and_keeps_the_last_billing_event() {
    let (accounts, store, _) = seeded().await;
    let mut billed = (*store.account("acct_free").await.unwrap().unwrap()).clone();
    billed.billing_event_at = Some("2026-01-01T00:00:00Z".parse().unwrap());
    store.put_account(&billed).await.unwrap();
    let e = EntitlementEdit {
        extra_features: vec!["export".into(), "  ".into()],
        quota_overrides: vec![
            quota("requests", 5000, "month", None),
            quota("requests", 3, "", Some(Duration::from_secs(2))),
        ],
        stripe_customer: "cus_1".into(),
        ..edit("acct_free", "free")
    };
    let state = accounts.put(e).await.unwrap();
    let a = &state.account;
    assert_eq!(a.extra_features.iter().collect::<Vec<_>>(), ["export"], "blank features are dropped");
    assert_eq!(a.quota_overrides[1].window, Window::Rolling(Duration::from_secs(2)));
    assert_eq!(a.billing_event_at, billed.billing_event_at, "a put never rolls billing back");
    assert_eq!(store.account("acct_free").await.unwrap().as_deref(), Some(a.as_ref()));
    // A new account is created.
    assert_eq!(accounts.put(edit("acct_new", "payg")).await.unwrap().credits, 0);
    assert_eq!(&*accounts.get("acct_new").await.unwrap().account.plan, "payg");
}

#[tokio::test]
async fn usage_is_what_a_check_settles_and_resets_to_zero() {
    let (accounts, store, _) = seeded().await;
    let config = demo();
    let account = store.account("acct_free").await.unwrap().unwrap();
    let plan = &config.policy.plans["free"];
    let spend = Spend {
        account: account.id.clone(),
        quotas: account.quotas_for(plan, "requests"),
        cost: 3,
        credits: None,
        now: Utc::now(),
        dry_run: false,
        shadow: false,
    };
    assert!(store.spend(&spend).await.unwrap().spent);
    let usage = accounts.usage("acct_free", "").await.unwrap();
    assert_eq!((usage.account.as_str(), usage.plan.as_str(), usage.credits), ("acct_free", "free", None));
    let used: Vec<(String, u64, u64)> =
        usage.quotas.iter().map(|q| (q.quota.policy_name(), q.used, q.remaining)).collect();
    assert_eq!(used, [("requests-month".into(), 3, 997), ("requests-1s".into(), 3, 7)]);
    assert!(accounts.usage("acct_free", "ai_tokens").await.unwrap().quotas.is_empty(), "filtered by meter");

    let reset = accounts.reset_usage("acct_free", "requests").await.unwrap();
    assert!(reset.quotas.iter().all(|q| q.used == 0 && q.remaining == q.quota.limit), "{reset:?}");
    assert_eq!(accounts.usage("acct_wallet", "").await.unwrap().credits, Some(500), "a prepaid plan shows its balance");
    let err = accounts.usage("acct_free", "a\nb").await.unwrap_err();
    assert!(matches!(err, AccountsError::Invalid(ref i) if i.field == "meter"), "{err:?}");
}

#[tokio::test]
async fn an_account_whose_plan_is_gone_is_a_failed_precondition_not_a_panic() {
    let (accounts, store, _) = seeded().await;
    let orphan = Account { id: "acct_orphan".into(), plan: "gold".into(), ..Account::default() };
    store.put_account(&orphan).await.unwrap();
    assert!(matches!(accounts.usage("acct_orphan", "").await, Err(AccountsError::PlanUnknown(p)) if p == "gold"));
    assert!(matches!(accounts.reset_usage("acct_orphan", "").await, Err(AccountsError::PlanUnknown(_))));
    assert_eq!(&*accounts.get("acct_orphan").await.unwrap().account.plan, "gold", "it can still be read and fixed");
}

#[tokio::test]
async fn credits_are_bounded_and_never_go_negative() {
    let (accounts, _, _) = seeded().await;
    assert_eq!(accounts.set_credits("acct_wallet", 10).await.unwrap(), 10);
    assert_eq!(accounts.add_credits("acct_wallet", -4).await.unwrap(), 6);
    assert!(matches!(accounts.add_credits("acct_wallet", -7).await, Err(AccountsError::BalanceOutOfRange)));
    assert_eq!(accounts.get("acct_wallet").await.unwrap().credits, 6, "nothing changed");
    let too_much = accounts.set_credits("acct_wallet", MAX_CREDITS + 1).await.unwrap_err();
    assert_eq!(too_much.to_string(), format!("credits: must be at most {MAX_CREDITS}"));
    let too_far = accounts.add_credits("acct_wallet", i64::MIN).await.unwrap_err();
    assert_eq!(too_far.to_string(), format!("delta: must be within ±{MAX_CREDITS}"));
    assert!(
        matches!(accounts.set_credits("acct_ghost", 1).await, Err(AccountsError::NotFound(id)) if id == "acct_ghost")
    );
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_by_id() {
    let (accounts, store, _) = seeded().await;
    let new = accounts.create_key("acct_pro", "ci").await.unwrap();
    assert!(new.key.starts_with("tg_") && new.key.len() == 43, "{}", new.key);
    assert_eq!(store.account_for_key(&KeyHash::of(&new.key)).await.unwrap().as_deref(), Some("acct_pro"));
    let listed = accounts.list_keys("acct_pro").await.unwrap();
    assert!(listed.iter().any(|(h, m)| *h == new.hash && m.name == "ci"), "{listed:?}");
    assert!(accounts.revoke_key("acct_pro", &new.hash.to_hex()).await.unwrap());
    assert!(!accounts.revoke_key("acct_pro", &new.hash.to_hex()).await.unwrap(), "revoked once");
    assert_eq!(store.account_for_key(&new.hash).await.unwrap(), None);

    let bad_id = accounts.revoke_key("acct_pro", "xyz").await.unwrap_err();
    assert!(bad_id.to_string().starts_with("key_id:"), "{bad_id}");
    let bad_name = accounts.create_key("acct_pro", &"n".repeat(129)).await.unwrap_err();
    assert!(bad_name.to_string().starts_with("name:"), "{bad_name}");
    assert!(matches!(accounts.create_key("acct_ghost", "").await, Err(AccountsError::NotFound(_))));
}

#[tokio::test]
async fn blocking_keeps_the_rest_of_the_entitlement() {
    let (accounts, store, _) = seeded().await;
    let before = store.account("acct_free").await.unwrap().unwrap();
    let state = accounts.set_blocked("acct_free", true).await.unwrap();
    assert!(state.account.blocked);
    assert_eq!(Account { blocked: false, ..(*state.account).clone() }, *before);
    assert!(!accounts.set_blocked("acct_free", false).await.unwrap().account.blocked);
}

#[tokio::test]
async fn seeding_is_idempotent_and_refuses_unknown_plans_before_writing() {
    let config = demo();
    let store = MemoryStore::new();
    for _ in 0..2 {
        assert_eq!(Accounts::seed(&store, &config.accounts, &config.policy.plans).await.unwrap(), 6);
    }
    assert_eq!(store.credits("acct_wallet").await.unwrap(), 500, "credits are set, not added");
    assert_eq!(store.account_for_key(&KeyHash::of("demo-pro-key")).await.unwrap().as_deref(), Some("acct_pro"));

    let empty = MemoryStore::new();
    let mut seeds = config.accounts.clone();
    seeds[1].account.plan = "gold".into();
    let err = Accounts::seed(&empty, &seeds, &config.policy.plans).await.unwrap_err();
    assert!(matches!(err, AccountsError::PlanUnknown(ref p) if p == "gold"), "{err:?}");
    assert_eq!(empty.account("acct_free").await.unwrap(), None, "nothing was written");
}

/// A store that fails every call (or never answers).
struct Broken {
    hang: bool,
    corrupt: bool,
}

impl Broken {
    async fn answer<T>(&self) -> Result<T, StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(if self.corrupt {
            StoreError::Corrupt("account acct_pro: expected value at line 1".into())
        } else {
            StoreError::Unavailable("connection refused".into())
        })
    }
}

#[async_trait]
impl Store for Broken {
    fn account_for_key<'a>(&'a self, _: &'a KeyHash) -> Reply<'a, Result<Option<Arc<str>>, StoreError>> {
        Reply::later(async move { self.answer().await })
    }
    fn account<'a>(&'a self, _: &'a str) -> Reply<'a, Result<Option<Arc<Account>>, StoreError>> {
        Reply::later(async move { self.answer().await })
    }
    fn spend<'a>(&'a self, _: &'a Spend) -> Reply<'a, Result<SpendAnswer, StoreError>> {
        Reply::later(async move { self.answer().await })
    }
    async fn put_account(&self, _: &Account) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn put_account_if_newer(&self, _: &Account) -> Result<bool, StoreError> {
        self.answer().await
    }
    async fn account_for_customer(&self, _: &str) -> Result<Option<String>, StoreError> {
        self.answer().await
    }
    async fn put_key(&self, _: &KeyHash, _: &str, _: &KeyMeta) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn revoke_key(&self, _: &str, _: &KeyHash) -> Result<bool, StoreError> {
        self.answer().await
    }
    async fn list_keys(&self, _: &str) -> Result<Vec<(KeyHash, KeyMeta)>, StoreError> {
        self.answer().await
    }
    async fn set_credits(&self, _: &str, _: u64) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn credits(&self, _: &str) -> Result<u64, StoreError> {
        self.answer().await
    }
    async fn add_credits(&self, _: &str, _: i64) -> Result<Option<u64>, StoreError> {
        self.answer().await
    }
    async fn reset_usage(&self, _: &str, _: &[Quota], _: DateTime<Utc>) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn remember_event(&self, _: &str, _: Duration) -> Result<bool, StoreError> {
        self.answer().await
    }
    async fn forget_event(&self, _: &str) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn settle(&self, _: &crate::usage::Adjustment) -> Result<crate::usage::Settled, StoreError> {
        self.answer().await
    }
    async fn record_settled(
        &self,
        _: &str,
        _: DateTime<Utc>,
        _: &[String],
        _: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.answer().await
    }
    async fn charge_key(&self) -> Result<[u8; 32], StoreError> {
        self.answer().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.answer().await
    }
}

#[tokio::test]
async fn store_calls_are_timed_out_and_counted_like_the_check_paths() {
    let (accounts, metrics) = service_over(Arc::new(Broken { hang: true, corrupt: false }));
    let started = std::time::Instant::now();
    let err = accounts.get("acct_pro").await.unwrap_err();
    assert!(matches!(err, AccountsError::Store(StoreError::Timeout(d)) if d == Duration::from_millis(20)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by store.timeout");
    let err = accounts.remember_event("evt_1", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, AccountsError::Store(StoreError::Timeout(_))), "webhook calls too: {err:?}");
    let text = metrics.encode();
    assert!(text.contains("tollgate_store_errors_total 2"), "{text}");
    assert!(text.contains("tollgate_store_duration_seconds_count 2"), "{text}");
}

#[tokio::test]
async fn store_faults_are_store_errors_and_inputs_are_checked_before_any_call() {
    for corrupt in [false, true] {
        let (accounts, metrics) = service_over(Arc::new(Broken { hang: false, corrupt }));
        let err = accounts.set_blocked("acct_pro", true).await.unwrap_err();
        assert!(matches!(err, AccountsError::Store(ref e) if e.is_transient() != corrupt), "{err:?}");
        // Refused before the store is asked: no call, no error counted.
        assert!(matches!(accounts.get("acct{pro}").await, Err(AccountsError::Invalid(_))));
        assert!(matches!(accounts.put(edit("acct_pro", "gold")).await, Err(AccountsError::Invalid(_))));
        assert!(metrics.encode().contains("tollgate_store_errors_total 1"), "one failed call");
    }
}

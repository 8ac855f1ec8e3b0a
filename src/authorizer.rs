//! The one path every decision takes: route, identify, ask the store, decide, render.
//!
//! Transports (`grpc::ext_authz`, `grpc::api`) translate their requests into a
//! [`Query`] and the [`Outcome`] back; everything in between is here. Holds
//! the live config behind an `ArcSwap`, so a reload swaps it atomically while
//! in-flight requests finish on the snapshot they loaded.
//!
//! May use: `config`, `route`, `identity`, `decision`, `entitlement`, `problem`,
//! `store`, `metrics` — everything below the transports, nothing above.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};

use crate::config::{Config, DynamicMetadata, OnError, TrustedCallers};
use crate::decision::{self, AllowKind, Caller, Code, Decision, Step, Target, Unmatched, Verdict};
use crate::entitlement::is_valid_account_id;
use crate::entitlement::{Account, Few, Period, Window};
use crate::identity::{Credentials, KeyHash, Presented, credential_headers, identify, is_valid_key};
use crate::metrics::Metrics;
use crate::problem::{self, Response};
use crate::route::{RouteKey, check_path, match_form};
use crate::settlement::Charge;
use crate::store::{Store, StoreError};
use crate::usage::Spend;
use crate::x402;

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a, C> {
    /// A request whose credentials are found by the configured identity sources.
    Request(&'a C),
    /// An account id given directly (internal API).
    AccountId(&'a str),
    /// An API key given directly (internal API).
    ApiKey(&'a str),
}

/// What is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// An HTTP request, matched against the route table.
    Http(RouteKey<'a>),
    /// A feature and meter directly (internal API).
    Feature {
        /// Feature the plan must include.
        feature: Option<&'a str>,
        /// Meter to spend.
        meter: Option<&'a str>,
    },
    /// A Check without HTTP attributes (Istio's network-level filter).
    NotHttp,
}

/// One authorization question.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a, C> {
    /// Who.
    pub subject: Subject<'a, C>,
    /// What.
    pub ask: Ask<'a>,
    /// Units to spend instead of the route's cost.
    pub cost: Option<u64>,
    /// Check without spending.
    pub dry_run: bool,
    /// The caller presented a client certificate the server verified (mTLS);
    /// with `server.trusted_callers` it decides whether asserted identities
    /// (JWT metadata, trusted headers) are honoured.
    pub peer_verified: bool,
    /// The transport carries the client's own headers unfiltered (the HTTP
    /// door: Traefik forwards them all), so asserted identities are never
    /// honoured, whatever `server.trusted_callers` says.
    pub client_headers_unfiltered: bool,
    /// The proxy said (gRPC metadata [`crate::config::OWN_HEADERS_SHOWN`])
    /// that it shows tollgate every `x-tollgate-*` header a client sends or
    /// removes them first: under `server.remove_own_headers: auto` an allow
    /// then removes only those the Check carried.
    pub own_headers_shown: bool,
}

/// The answer, rendered.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// What client and upstream see.
    pub response: Response,
    /// The matched route's name, for logs (`/v1/search*`); `None` when none matched.
    pub route: Option<Arc<str>>,
    /// What the request spent that its response may change, signed: the
    /// Check's `charge` metadata (see `settlement`); only for
    /// Envoy's Checks, and only when settlement could change something.
    pub charge: Option<String>,
    /// Whether a Check answer carries Envoy dynamic metadata
    /// (`server.dynamic_metadata`); see [`Outcome::metadata`].
    pub carries_metadata: bool,
}

impl Outcome {
    /// An outcome whose answer carries metadata as `config` says: always
    /// under `server.dynamic_metadata: full`; under `lean`, only when the
    /// access log or settlement needs it (a deny, a grace, fail-open or paid
    /// allow, a shadowed code, a charge).
    pub fn new(
        config: &Config,
        decision: Decision,
        response: Response,
        route: Option<Arc<str>>,
        charge: Option<String>,
    ) -> Self {
        let plain = matches!(decision.verdict, Verdict::Allow(AllowKind::Allowed | AllowKind::Public))
            && decision.shadowed.is_none()
            && charge.is_none();
        let carries_metadata = config.server.dynamic_metadata == DynamicMetadata::Full || !plain;
        Self { decision, response, route, charge, carries_metadata }
    }

    /// The Check answer's `dynamic_metadata` fields: account, plan and
    /// decision for access logs, the shadowed code, the signed charge for
    /// settlement; none when the answer goes without.
    pub fn metadata(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let d = &self.decision;
        [
            ("account", d.account.as_deref()),
            ("plan", d.plan.as_deref()),
            ("decision", Some(d.verdict.label())),
            // Access logs can show what shadow mode let through.
            ("shadow", d.shadowed.map(|c| c.as_str())),
            (crate::settlement::FIELD, self.charge.as_deref()),
        ]
        .into_iter()
        .filter(|_| self.carries_metadata)
        .filter_map(|(k, v)| Some((k, v?)))
    }

    /// Puts the decision on the current request's span (when tracing is on):
    /// route, code, status, account id and plan; never a credential.
    pub fn trace(&self) {
        let d = &self.decision;
        crate::telemetry::record_decision(crate::telemetry::Recorded {
            route: self.route.as_deref(),
            decision: d.verdict.label(),
            status: d.verdict.http_status(),
            account: d.account.as_deref(),
            plan: d.plan.as_deref(),
        });
    }
}

/// A payment's claim in the store, given back (in a task of its own) when
/// dropped before [`Unclaim::keep`]: the settlement's answer never came.
struct Unclaim {
    store: Option<Arc<dyn Store>>,
    id: String,
}

impl Unclaim {
    /// The settlement answered: the claim stands.
    fn keep(&mut self) {
        self.store = None;
    }
}

impl Drop for Unclaim {
    fn drop(&mut self) {
        if let Some(store) = self.store.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let id = std::mem::take(&mut self.id);
            rt.spawn(async move {
                if let Err(e) = store.forget_event(&id).await {
                    tracing::warn!(error = %e, "x402: a payment's claim could not be given back");
                }
            });
        }
    }
}

/// The x402 part of an answer, owned (rendered as a [`problem::Payment`]).
#[derive(Debug, Clone)]
enum PaymentView {
    Challenge { header: String, amount: String, error: Option<String> },
    Paid { response: String, payer: String, receipt: String },
}

impl PaymentView {
    fn view<'a>(&'a self, x: &'a x402::Settings) -> problem::Payment<'a> {
        match self {
            PaymentView::Challenge { header, amount, error } => problem::Payment::Challenge {
                header,
                amount,
                network: &x.network,
                asset: &x.asset,
                error: error.as_deref(),
            },
            PaymentView::Paid { response, payer, receipt } => problem::Payment::Paid { response, payer, receipt },
        }
    }
}

/// The store failed and `on_error: error` asks the transport to fail the RPC.
#[derive(Debug, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreUnavailable(#[from] pub StoreError);

/// Decides requests against the live config and the store.
pub struct Authorizer {
    config: ArcSwap<Config>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    charges: Charges,
    /// The x402 facilitator's client, made on the first paid retry.
    facilitator: std::sync::OnceLock<x402::Facilitator>,
}

/// How long a fetched signing key is used before it is read again (a key
/// lost from Redis and made anew by another replica is picked up within this).
const KEY_FRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// The signing keys this replica knows: the store's now, and the one before
/// it (charges signed before a change still verify).
#[derive(Default)]
struct Keys {
    current: Option<[u8; 32]>,
    previous: Option<[u8; 32]>,
    fetched: Option<std::time::Instant>,
}

/// Makes charge ids and signs charges.
struct Charges {
    /// The store's signing keys, read on first need and every [`KEY_FRESH`].
    keys: std::sync::Mutex<Keys>,
    /// Set while one caller reads the key again (the others use the current one).
    refreshing: std::sync::atomic::AtomicBool,
    /// Random per process: ids from different replicas never collide.
    prefix: u64,
    next: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    /// An authorizer over `store` with `config`.
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let mut prefix = [0u8; 8];
        // Without randomness, the time still tells replicas apart in practice.
        if getrandom::fill(&mut prefix).is_err() {
            prefix = Utc::now().timestamp_nanos_opt().unwrap_or_default().to_le_bytes();
        }
        let charges = Charges {
            keys: std::sync::Mutex::new(Keys::default()),
            refreshing: std::sync::atomic::AtomicBool::new(false),
            prefix: u64::from_le_bytes(prefix),
            next: std::sync::atomic::AtomicU64::new(0),
        };
        Self { config: ArcSwap::new(config), store, metrics, charges, facilitator: std::sync::OnceLock::new() }
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Whether the config in force defines `plan` (without taking a reference to the config).
    pub fn has_plan(&self, plan: &str) -> bool {
        self.config.load().policy.plans.contains_key(plan)
    }

    /// Swaps in a new config; requests already running keep the old one.
    pub fn replace_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// The store (for health checks and the internal API).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs a store call under the configured timeout, timing it and counting
    /// failures: every store call a request makes (Checks, `Authorize`, the
    /// accounts service) goes through here.
    pub(crate) async fn call<T>(
        &self,
        timeout: std::time::Duration,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.call_lazy(timeout, move || f).await
    }

    /// [`Authorizer::call`] for a call made by `make`, which runs once the
    /// clock is started: a store that answers the Check's calls at once
    /// (`store::Reply::now`, the memory store) does its work when the call
    /// is made, and that work is the call's time. A call answered on its
    /// first poll takes no timer: nothing is left to wait for.
    pub(crate) async fn call_lazy<T, F: Future<Output = Result<T, StoreError>>>(
        &self,
        timeout: std::time::Duration,
        make: impl FnOnce() -> F,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let mut call = std::pin::pin!(make());
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        let r = match first {
            Poll::Ready(r) => r,
            Poll::Pending => match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(timeout)),
            },
        };
        let elapsed = started.elapsed();
        self.metrics.record_store_call(elapsed);
        crate::telemetry::note_store_call(elapsed);
        if r.is_err() {
            self.metrics.record_store_error();
        }
        r
    }

    /// This process's id among replicas (charge ids start with it; the outbox consumer is named by it).
    pub fn replica_id(&self) -> String {
        format!("{:016x}", self.charges.prefix)
    }

    /// The key charges are signed with, from the store: read on first need
    /// and again after [`KEY_FRESH`] (under the store timeout; while it is
    /// read, or when reading fails, the one known is used).
    pub async fn charge_key(&self, timeout: std::time::Duration) -> Result<[u8; 32], StoreError> {
        let (current, fresh) = {
            let k = self.charges.keys.lock().unwrap_or_else(|e| e.into_inner());
            (k.current, k.fetched.is_some_and(|at| at.elapsed() < KEY_FRESH))
        };
        match current {
            Some(key) if fresh => Ok(key),
            Some(key) => {
                use std::sync::atomic::Ordering;
                if self.charges.refreshing.swap(true, Ordering::AcqRel) {
                    return Ok(key);
                }
                let read = self.refresh_charge_key(timeout).await;
                self.charges.refreshing.store(false, Ordering::Release);
                Ok(read.unwrap_or(key))
            }
            None => self.refresh_charge_key(timeout).await,
        }
    }

    /// Reads the signing key from the store now; the one it replaces stays
    /// known as the previous key.
    pub async fn refresh_charge_key(&self, timeout: std::time::Duration) -> Result<[u8; 32], StoreError> {
        let key = self.call(timeout, self.store.charge_key()).await?;
        let mut k = self.charges.keys.lock().unwrap_or_else(|e| e.into_inner());
        if k.current != Some(key) {
            if k.current.is_some() {
                tracing::warn!(
                    "the charge signing key in the store changed; charges signed with the old one still verify"
                );
            }
            k.previous = k.current;
            k.current = Some(key);
        }
        k.fetched = Some(std::time::Instant::now());
        Ok(key)
    }

    /// The key known before the current one, if the store's key changed.
    pub fn previous_charge_key(&self) -> Option<[u8; 32]> {
        self.charges.keys.lock().unwrap_or_else(|e| e.into_inner()).previous
    }

    /// When the key was last read (for rate-limiting reads after a failed verification).
    pub fn charge_key_age(&self) -> Option<std::time::Duration> {
        self.charges.keys.lock().unwrap_or_else(|e| e.into_inner()).fetched.map(|at| at.elapsed())
    }

    /// The signed charge for a request that spent `spend` on a route whose
    /// response reports its cost in `cost_header`, when settlement has work:
    /// some classes are not charged, the response reports the cost, or
    /// usage events are on (each settled charge is one).
    async fn charge(
        &self,
        config: &Config,
        spend: &Spend,
        meter: Option<&str>,
        cost_header: Option<&str>,
        shadow: Option<Code>,
    ) -> Option<String> {
        if config.billing.charge_on.is_all() && cost_header.is_none() && !config.events.enabled() {
            return None;
        }
        let periods: Vec<Period> = spend
            .quotas
            .iter()
            .filter_map(|q| match q.window {
                Window::Calendar(p) => Some(p),
                Window::Rolling(_) => None,
            })
            .collect();
        // The route's meter, named even when only credits were spent (usage events say what was used).
        let meter = meter.or(spend.quotas.first().map(|q| &*q.meter)).unwrap_or_default().to_owned();
        let key = match self.charge_key(config.store.timeout).await {
            Ok(k) => k,
            Err(e) => {
                // The reservation stands: the request is charged what the route costs.
                tracing::warn!(error = %e, "no key to sign a charge with; this request will not be settled");
                self.metrics.record_settlement("unsigned");
                return None;
            }
        };
        let seq = self.charges.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let charge = Charge {
            id: format!("{:016x}-{seq:x}", self.charges.prefix),
            account: spend.account.to_string(),
            // Whole milliseconds, as the charge carries it: the windows are the same.
            issued: DateTime::from_timestamp_millis(spend.now.timestamp_millis()).unwrap_or(spend.now),
            meter,
            periods,
            cost: spend.cost,
            // A shadow spend took no credits: settling it must move none.
            credits: spend.credits.is_some() && !spend.shadow,
            cost_header: cost_header.map(str::to_owned),
            shadow,
        };
        Some(charge.seal(&key))
    }

    /// The account a credential names; `None` when none was presented or it names no account.
    async fn resolve(&self, config: &Config, presented: &Presented<'_>) -> Result<Option<Arc<Account>>, StoreError> {
        let timeout = config.store.timeout;
        // Bounded before any cache or store lookup: a malformed credential names no account.
        let found: Arc<str>;
        let id: &str = match presented {
            Presented::Nothing => return Ok(None),
            Presented::Account(id) if !is_valid_account_id(id) => return Ok(None),
            Presented::ApiKey { key, .. } if !is_valid_key(key) => return Ok(None),
            Presented::Account(id) => id.as_ref(),
            Presented::ApiKey { key, .. } => {
                let hash = KeyHash::of(key);
                match self.call_lazy(timeout, || self.store.account_for_key(&hash)).await? {
                    Some(id) => {
                        found = id;
                        &found
                    }
                    None => return Ok(None),
                }
            }
        };
        self.call_lazy(timeout, || self.store.account(id)).await
    }

    /// Decides `query` now.
    pub async fn authorize<C: Credentials>(&self, query: Query<'_, C>) -> Result<Outcome, StoreUnavailable> {
        let config = self.config.load_full();
        let now = Utc::now();
        self.authorize_at(&config, query, now).await
    }

    async fn authorize_at<C: Credentials>(
        &self,
        config: &Config,
        query: Query<'_, C>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, StoreUnavailable> {
        // Headers the upstream must not see from the client, whatever is decided.
        let strip = match query.subject {
            Subject::Request(creds) => strip_headers(config, creds),
            _ => Strip::new(),
        };
        let removals = problem::Removals { strip: &strip, own_shown: query.own_headers_shown };
        // On an HTTP request: the matched route's x402 settings, and the URL a challenge names.
        let mut paying: Option<(Option<&crate::x402::RouteX402>, &str, &str, &str)> = None;
        let (target, route, cost_header) = match query.ask {
            Ask::NotHttp => {
                let d = match config.non_http {
                    Unmatched::Allow => Decision::allow(AllowKind::Public),
                    Unmatched::Deny => Decision::deny(Code::RouteNotAllowed),
                };
                return Ok(self.finish(config, d, removals, None, now));
            }
            Ask::Http(key) => {
                // Routes match the path alone, and only its normal form: the
                // upstream decides what a path means, so one it could read as
                // another (dot segments, encoded slashes) is refused.
                let path = key.path.split('?').next().unwrap_or("");
                if let Err(e) = check_path(path) {
                    tracing::debug!(reason = %e, "path not in normal form");
                    return Ok(self.finish(config, Decision::deny(Code::RequestInvalid), removals, None, now));
                }
                let host = key.host;
                let form = match_form(path);
                let key = RouteKey { path: &form, ..key };
                let found = config.routes.find(&key);
                if config.x402.is_some() {
                    let name = found.map_or("", |r| &*r.name);
                    paying = Some((found.and_then(|r| r.x402.as_ref()), host, path, name));
                }
                match found {
                    Some(r) if r.public => (Target::Public, Some(r.name.clone()), None),
                    Some(r) => (
                        Target::Metered {
                            feature: r.feature.as_deref(),
                            meter: r.meter.as_deref(),
                            cost: query.cost.filter(|c| *c > 0).unwrap_or(r.cost),
                            shadow: r.shadow,
                        },
                        Some(r.name.clone()),
                        r.cost_from_response.as_deref(),
                    ),
                    None => (Target::Unmatched, None, None),
                }
            }
            Ask::Feature { feature, meter } => (
                Target::Metered { feature, meter, cost: query.cost.filter(|c| *c > 0).unwrap_or(1), shadow: None },
                None,
                None,
            ),
        };
        // Only Envoy's Checks are settled from an access log.
        let settles = matches!((&query.subject, &query.ask), (Subject::Request(_), Ask::Http(_)));
        if target == Target::Public {
            return Ok(self.finish(config, Decision::allow(AllowKind::Public), removals, route, now));
        }

        let presented = match query.subject {
            Subject::Request(creds) => {
                let trusted = !query.client_headers_unfiltered
                    && match config.server.trusted_callers {
                        TrustedCallers::Any => true,
                        TrustedCallers::None => false,
                        TrustedCallers::Mtls => query.peer_verified,
                    };
                identify(&config.identity, creds, trusted)
            }
            Subject::AccountId(id) => Presented::Account(Cow::Borrowed(id)),
            Subject::ApiKey(key) => Presented::ApiKey { header: Cow::Borrowed(""), key: Cow::Borrowed(key) },
        };
        let account = match self.resolve(config, &presented).await {
            Ok(account) => account,
            Err(e) => return self.store_failed(config, e, None, removals, route, now),
        };
        let caller = match (&account, &presented) {
            (Some(a), _) => Caller::Known(a),
            (None, Presented::Nothing) => Caller::Missing,
            (None, _) => Caller::Invalid,
        };
        let mut charge = None;
        let (meter, cost) = match target {
            Target::Metered { meter, cost, .. } => (meter, cost),
            _ => (None, 0),
        };
        let decision = match decision::evaluate(&config.policy, target, caller, now, query.dry_run) {
            Step::Done(d) => {
                // A metered route on which the plan has no quota and no credits:
                // nothing was spent, yet the request was used. With events on
                // (or a reported cost) it carries a charge with nothing to
                // adjust, so its usage event is made like any other's.
                let used = settles && !query.dry_run && d.is_allowed() && meter.is_some();
                if used
                    && (config.events.enabled() || cost_header.is_some())
                    && let Some(account) = &d.account
                {
                    let spend = Spend {
                        account: account.clone(),
                        quotas: Few::new(),
                        cost,
                        credits: None,
                        now,
                        dry_run: false,
                        shadow: false,
                    };
                    charge = self.charge(config, &spend, meter, cost_header, d.shadowed).await;
                }
                d
            }
            Step::Spend(spend, partial) => {
                match self.call_lazy(config.store.timeout, || self.store.spend(&spend)).await {
                    Ok(answer) => {
                        let d = decision::settle(&spend, &answer, partial);
                        if settles && answer.spent && d.is_allowed() {
                            charge = self.charge(config, &spend, meter, cost_header, d.shadowed).await;
                        }
                        d
                    }
                    Err(e) => return self.store_failed(config, e, account.as_deref(), removals, route, now),
                }
            }
        };
        // x402: a challenge on a 402 a payment cures, or the paid retry settled.
        let (decision, payment) = match (config.x402.as_deref(), query.subject, paying) {
            (Some(x), Subject::Request(creds), Some(at)) if !query.dry_run => {
                match self.x402(config, x, creds, at, decision).await {
                    Ok(paid) => paid,
                    Err(e) => return self.store_failed(config, e, account.as_deref(), removals, route, now),
                }
            }
            _ => (decision, None),
        };
        if !query.dry_run {
            self.observe(&decision, route.as_deref());
        }
        let payment = payment.as_ref().zip(config.x402.as_deref()).map(|(p, x)| p.view(x));
        let response = problem::render(&decision, config, problem::Context { removals, payment }, now);
        Ok(Outcome::new(config, decision, response, route, charge))
    }

    /// The x402 step after the decision: a denial a payment cures gets a
    /// challenge; with `PAYMENT-SIGNATURE` the payment is read, verified,
    /// claimed once in the store, settled, and the call allowed (see `x402`).
    /// A store fault claiming the payment is the caller's to answer.
    async fn x402<C: Credentials>(
        &self,
        config: &Config,
        x: &x402::Settings,
        creds: &C,
        (route, host, path, name): (Option<&x402::RouteX402>, &str, &str, &str),
        d: Decision,
    ) -> Result<(Decision, Option<PaymentView>), StoreError> {
        let d = x402::demand(d, route.is_some_and(|r| r.payable));
        let price = match d.verdict {
            Verdict::Deny(code) if x402::curable(code) && !x402::rate_limited(&d) => {
                x402::price_for(x, route, d.plan.as_deref())
            }
            _ => None,
        };
        let Some(price) = price else { return Ok((d, None)) };
        let requirement = x402::requirement(x, price);
        let url = format!("https://{host}{path}");
        let challenge = |error: Option<&str>| PaymentView::Challenge {
            header: x402::challenge(&requirement, &url, name, error),
            amount: price.as_str().to_owned(),
            error: error.map(str::to_owned),
        };
        let refused = |r: x402::Refusal| {
            self.metrics.record_x402(r.label());
            tracing::info!(account = d.account.as_deref().unwrap_or("-"), route = name, reason = %r, "x402 payment refused");
            Some(challenge(Some(&r.to_string())))
        };
        let Some(sent) = creds.header(x402::SIGNATURE_HEADER) else {
            if creds.header(x402::V1_HEADER).is_some() {
                return Ok((d.clone(), refused(x402::Refusal::Version)));
            }
            self.metrics.record_x402("challenged");
            return Ok((d, Some(challenge(None))));
        };
        let payment = match x402::parse(&sent, &requirement) {
            Ok(p) => p,
            Err(r) => return Ok((d.clone(), refused(r))),
        };
        let facilitator = self.facilitator.get_or_init(x402::Facilitator::new);
        let failed = |e: x402::FacilitatorError, mut d: Decision| {
            self.metrics.record_x402("unavailable");
            tracing::warn!(error = %e, route = name, "x402 facilitator failed");
            match x.on_facilitator_error {
                x402::OnFacilitatorError::Unavailable => {
                    d.verdict = Verdict::Deny(Code::PaymentUnavailable);
                    (d, None)
                }
                x402::OnFacilitatorError::PaymentRequired => (d, Some(challenge(Some("facilitator_unavailable")))),
            }
        };
        match facilitator.verify(x, &payment, &requirement).await {
            Ok(Ok(())) => {}
            Ok(Err(r)) => return Ok((d.clone(), refused(r))),
            Err(e) => return Ok(failed(e, d.clone())),
        }
        // Claimed before it is settled: of two Checks carrying one payment,
        // one settles. A store that cannot claim it answers 503, whatever
        // `store.on_error` says: an unclaimed payment could be used twice.
        let id = x402::replay_id(&payment);
        match self.call(config.store.timeout, self.store.remember_event(&id, x402::replay_ttl(x))).await {
            Ok(true) => {}
            Ok(false) => return Ok((d.clone(), refused(x402::Refusal::Replay))),
            Err(e) => {
                tracing::warn!(error = %e, "x402: the store could not claim the payment");
                self.metrics.record_x402("unavailable");
                let mut d = d.clone();
                d.verdict = Verdict::Deny(Code::PaymentUnavailable);
                return Ok((d, None));
            }
        }
        // Until the settlement's answer is in: a Check cancelled (the proxy
        // gave up) or a facilitator that failed leaves the payment unclaimed
        // again, so the client can retry it (the chain's nonce keeps it from
        // settling twice).
        let mut claim = Unclaim { store: Some(self.store.clone()), id: id.clone() };
        let paid = match facilitator.settle(x, &payment, &requirement).await {
            Ok(Ok(p)) => p,
            Ok(Err(r)) => {
                claim.keep();
                return Ok((d.clone(), refused(r)));
            }
            Err(e) => return Ok(failed(e, d.clone())),
        };
        claim.keep();
        // A facilitator answering success twice for one transaction allows once.
        if paid.transaction != "unknown" {
            let tx = format!("x402tx:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&paid.transaction)));
            if let Ok(false) =
                self.call(config.store.timeout, self.store.remember_event(&tx, x402::replay_ttl(x))).await
            {
                return Ok((d.clone(), refused(x402::Refusal::Replay)));
            }
        }
        self.metrics.record_x402("settled");
        self.metrics.record_x402_amount(&paid.network, &x.asset, paid.amount);
        if config.events.enabled() {
            self.payment_event(config, &x402::event_id(&payment), d.account.as_deref(), name, &paid, x).await;
        }
        tracing::info!(
            account = d.account.as_deref().unwrap_or("-"),
            route = name,
            payer = %paid.payer,
            transaction = %paid.transaction,
            amount = paid.amount,
            "x402 payment settled; the call is allowed"
        );
        let mut d = d;
        d.verdict = Verdict::Allow(AllowKind::Paid);
        d.denied_quota = None;
        let view = PaymentView::Paid {
            response: x402::response(&paid),
            receipt: format!("network={}; transaction={}; amount={}", paid.network, paid.transaction, paid.amount),
            payer: paid.payer,
        };
        Ok((d, Some(view)))
    }

    /// What a decision that counted shows besides its answer: under shadow
    /// mode the would-be verdict (a metric, and a log line per would-be
    /// deny), and the units a soft quota let past its limit.
    fn observe(&self, d: &Decision, route: Option<&str>) {
        if d.shadow {
            self.metrics.record_shadow(d.shadowed.map_or(d.verdict, decision::Verdict::Deny));
        }
        if let Some(code) = d.shadowed {
            tracing::info!(
                target: "tollgate::shadow",
                code = %code,
                account = %d.account.as_deref().unwrap_or("-"),
                plan = %d.plan.as_deref().unwrap_or("-"),
                route = %route.unwrap_or("-"),
                "shadow mode let through a request it would have denied"
            );
        }
        for q in d.overages() {
            let units = q.overage_of(d.cost);
            if units > 0 {
                self.metrics.record_overage(q.quota.policy_name(), units);
            }
        }
    }

    /// Queues a settled payment's event (events on): a zero adjustment under
    /// the payment's id carries it into the outbox, once. Account-less payers'
    /// events wait under `x402:<payer>`. A store fault loses the event, not the call.
    async fn payment_event(
        &self,
        config: &Config,
        id: &str,
        account: Option<&str>,
        route: &str,
        paid: &x402::Paid,
        x: &x402::Settings,
    ) {
        let now = Utc::now();
        let facts = crate::events::PaymentFacts {
            id,
            account,
            route,
            payer: &paid.payer,
            transaction: &paid.transaction,
            network: &paid.network,
            asset: &x.asset,
            amount: paid.amount,
            time: now,
        };
        let adjustment = crate::usage::Adjustment {
            // Account ids are at most 128 bytes; the payer is ASCII, at most 128.
            account: account
                .map_or_else(|| format!("x402:{}", &paid.payer[..paid.payer.len().min(123)]), str::to_owned),
            charge: id.to_owned(),
            issued: now,
            meter: "x402".into(),
            periods: Vec::new(),
            delta: 0,
            credits: false,
            remember_until: now + chrono::Duration::hours(1),
            event: Some(crate::events::payment(&config.events.source, facts)),
            marks: Vec::new(),
            outbox_limit: config.events.outbox_limit,
        };
        match self.call(config.store.timeout, self.store.settle(&adjustment)).await {
            Ok(crate::usage::Settled::Applied { queued, dropped, .. }) => {
                self.metrics.record_events("queued", u64::from(queued));
                self.metrics.record_events("dropped", u64::from(dropped));
            }
            Ok(crate::usage::Settled::Duplicate) => {}
            Err(e) => {
                tracing::warn!(error = %e, transaction = %paid.transaction, "the payment's event was not queued");
                self.metrics.record_events("dropped", 1);
            }
        }
    }

    fn store_failed(
        &self,
        config: &Config,
        error: StoreError,
        account: Option<&Account>,
        removals: problem::Removals<'_>,
        route: Option<Arc<str>>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, StoreUnavailable> {
        tracing::warn!(error = %error, transient = error.is_transient(), on_error = ?config.store.on_error, "store call failed");
        let mut d = match config.store.on_error {
            OnError::Error => return Err(StoreUnavailable(error)),
            OnError::Deny => Decision::deny(Code::StoreUnavailable),
            OnError::Allow => Decision::allow(AllowKind::FailOpen),
        };
        if let Some(a) = account {
            d.account = Some(a.id.clone());
            d.plan = Some(a.plan.clone());
        }
        Ok(self.finish(config, d, removals, route, now))
    }

    fn finish(
        &self,
        config: &Config,
        decision: Decision,
        removals: problem::Removals<'_>,
        route: Option<Arc<str>>,
        now: DateTime<Utc>,
    ) -> Outcome {
        let response = problem::render(&decision, config, problem::Context { removals, payment: None }, now);
        Outcome::new(config, decision, response, route, None)
    }
}

/// The request headers to remove before the upstream: every configured
/// credential header present and every `x-tollgate-*` header the client sent
/// (only tollgate may set those; `problem` overwrites the ones it sets).
/// The configured names are the config's own (shared, not copied); a
/// forged `x-tollgate-*` name is copied.
fn strip_headers<C: Credentials>(config: &Config, creds: &C) -> Strip {
    let mut out = Strip::new();
    for name in credential_headers(&config.identity, creds) {
        if !out.iter().any(|h| h == &**name) {
            out.push(problem::Text::from(name));
        }
    }
    // Each prefixed name comes once (sorted, deduplicated): compared with the
    // few credential names alone, a flood of names costs n, not n².
    let credentials = out.len();
    for name in creds.headers_with_prefix(problem::HEADER_PREFIX) {
        if !out.iter().take(credentials).any(|h| *h == *name) {
            out.push(problem::Text::Owned(name.into_owned()));
        }
    }
    // With x402 on, a payment is tollgate's to settle, never the upstream's to reuse.
    if config.x402.is_some() {
        for name in [x402::SIGNATURE_HEADER, x402::V1_HEADER] {
            if creds.header(name).is_some() && !out.iter().take(credentials).any(|h| &**h == name) {
                out.push(problem::Text::Static(name));
            }
        }
    }
    out
}

/// The request headers to remove before the upstream: the configured
/// credential headers' names are the config's (shared, not copied), and a
/// request usually carries one, so the list lives inline.
type Strip = smallvec::SmallVec<[problem::Name; 2]>;

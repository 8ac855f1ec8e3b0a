//! Prometheus metrics of SPEC §8, encoded by `prometheus-client`.
//!
//! Label values are `&'static str` so recording allocates nothing on the
//! Check path. Depends on `decision` and `settlement` for the label names and
//! on `usage` for lease mode's totals only.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::decision::Verdict;
use crate::usage::LeaseTotals;

/// Each plan's per-status counters, found without building a label: read on
/// every Check, keyed by the config's plan names.
type PlanCounters = crate::FastMap<String, Vec<(&'static str, Counter)>>;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    status: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    rpc: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric the server exports, registered once at start-up.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    /// The series of `decisions` met so far, by verdict ([`verdict_index`]):
    /// a Check finds its counter without hashing a label set.
    decision_counters: [std::sync::OnceLock<Counter>; VERDICTS],
    check_duration: Histogram,
    /// The `hit` and `miss` series of `tollgate_cache_requests_total`, held so a lookup takes no lock.
    cache_hits: Counter,
    cache_misses: Counter,
    cache_hit_ratio: Gauge<f64, AtomicU64>,
    store_duration: Histogram,
    store_errors: Counter,
    config_reloads: Family<ResultLabels, Counter>,
    auth_failures: Family<AuthLabels, Counter>,
    /// Lease mode (`store::lease`), copied from the store's own counters at each scrape.
    lease: LeaseCounters,
    settlements: Family<ResultLabels, Counter>,
    settlement_bad: Family<ReasonLabels, Counter>,
    settlement_units: Family<KindLabels, Counter>,
    events: Family<ResultLabels, Counter>,
    event_lag: Histogram,
    shadow: Family<DecisionLabels, Counter>,
    overage: Family<PolicyLabels, Counter>,
    plan_decisions: Family<PlanLabels, Counter>,
    /// The series of `plan_decisions` met so far, by plan and status, so a
    /// Check finds its counter without building a label (no allocation)
    /// and without a lock (a read takes no shared write: two workers'
    /// Checks do not contend for it); a new series replaces the map.
    plan_counters: arc_swap::ArcSwap<PlanCounters>,
    /// Serialises the rare replacements of `plan_counters`.
    plan_counters_write: std::sync::Mutex<()>,
    doors: Family<DoorLabels, Counter>,
    /// The series of `doors` met so far, by door and status label.
    door_counters: [[std::sync::OnceLock<Counter>; STATUSES.len()]; DOORS.len()],
    /// Spans by result, copied from `telemetry`'s totals at each scrape.
    spans: Family<ResultLabels, Counter>,
    /// Held while totals kept elsewhere (lease mode's, the spans') are copied
    /// in: two scrapes at once must not both add the same difference.
    copying: std::sync::Mutex<()>,
    webhooks: Family<ResultLabels, Counter>,
    x402: Family<ResultLabels, Counter>,
    x402_amount: Family<AssetLabels, Counter>,
    ready: Gauge,
}

/// The `result` values of `tollgate_x402_payments_total`.
pub const X402_RESULTS: [&str; 7] =
    ["challenged", "settled", "malformed", "replayed", "invalid", "not_settled", "unavailable"];

/// Where an x402 payment settled (from config: a bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AssetLabels {
    network: String,
    asset: String,
}

/// The door a Check came in by, and its HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabels {
    door: &'static str,
    status: &'static str,
}

/// A plan the config defines, and the HTTP status of a Check.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlanLabels {
    plan: String,
    status: &'static str,
}

/// The `result` values of `tollgate_webhooks_total`.
pub const WEBHOOK_RESULTS: [&str; 5] = ["applied", "ignored", "signature", "rejected", "unavailable"];

/// A quota's policy name (`requests-month`): from config or an account's
/// overrides, so the set is bounded by what operators define.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The `result` values of `tollgate_settlements_total`.
pub const SETTLEMENT_RESULTS: [&str; 6] = ["applied", "unchanged", "duplicate", "bad", "failed", "unsigned"];

/// Lease mode's series: counters by event, and the units held now.
#[derive(Debug, Default)]
struct LeaseCounters {
    events: Family<ResultLabels, Counter>,
    outstanding: Gauge,
    spends: Counter,
    redis_calls: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Raises a counter that mirrors a total kept elsewhere to that total (called under `Metrics::copying`).
fn catch_up(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Every verdict: the allow kinds, then the deny codes.
const VERDICTS: usize = 5 + crate::decision::Code::ALL.len();

/// A verdict's place among [`VERDICTS`].
fn verdict_index(v: Verdict) -> usize {
    use crate::decision::AllowKind;
    match v {
        Verdict::Allow(kind) => match kind {
            AllowKind::Public => 0,
            AllowKind::Allowed => 1,
            AllowKind::Grace => 2,
            AllowKind::FailOpen => 3,
            AllowKind::Paid => 4,
        },
        Verdict::Deny(code) => 5 + crate::decision::Code::ALL.iter().position(|c| *c == code).unwrap_or(0),
    }
}

/// The door labels, in [`Metrics::door_counters`]' order.
const DOORS: [&str; 4] = ["grpc", "envoy_http", "traefik", "nginx"];
/// The status labels, in [`Metrics::door_counters`]' order.
const STATUSES: [&str; 9] = ["200", "400", "401", "402", "403", "429", "500", "503", "other"];

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        402 => "402",
        403 => "403",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("tollgate_decisions", "Check decisions by HTTP status and decision code", decisions.clone());
        let buckets = [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
        let check_duration = Histogram::new(buckets);
        registry.register(
            "tollgate_check_duration_seconds",
            "Time to answer one ext_authz Check, store calls included",
            check_duration.clone(),
        );
        let cache_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_cache_requests",
            "Entitlement cache lookups by result (hit, miss)",
            cache_requests.clone(),
        );
        let cache_hit_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "tollgate_cache_hit_ratio",
            "Share of cache lookups answered from the cache since start (for a window, use rate() of tollgate_cache_requests_total)",
            cache_hit_ratio.clone(),
        );
        let store_duration = Histogram::new(buckets);
        registry.register(
            "tollgate_store_duration_seconds",
            "Time of one store call (Checks, the admin API and webhooks; answered by the cache or the backend), failures included",
            store_duration.clone(),
        );
        let store_errors = Counter::default();
        registry.register("tollgate_store_errors", "Store calls that failed or timed out", store_errors.clone());
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register("tollgate_config_reloads", "Config reloads by result (ok, error)", config_reloads.clone());
        let auth_failures = Family::<AuthLabels, Counter>::default();
        registry.register(
            "tollgate_auth_failures",
            "tollgate.v1 calls refused for a missing or wrong admin/service token, by RPC and reason (missing, invalid)",
            auth_failures.clone(),
        );
        let lease = LeaseCounters::default();
        registry.register(
            "tollgate_leases",
            "Lease mode: leases taken and given back (result = taken, returned, expired)",
            lease.events.clone(),
        );
        registry.register(
            "tollgate_lease_units_outstanding",
            "Lease mode: units this replica holds, leased and not yet spent",
            lease.outstanding.clone(),
        );
        registry.register(
            "tollgate_lease_spends",
            "Lease mode: spends (metered Checks) it answered",
            lease.spends.clone(),
        );
        registry.register(
            "tollgate_lease_redis_calls",
            "Lease mode: Redis calls those spends made (divide by tollgate_lease_spends_total for calls per Check)",
            lease.redis_calls.clone(),
        );
        let settlements = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_settlements",
            "Charges met again in Envoy's access log, by result: applied (counters moved), unchanged (cost as reserved), duplicate (settled before), bad (refused, see tollgate_settlement_bad_entries_total), failed (store error; the reservation stands), unsigned (no key at Check time; not settleable)",
            settlements.clone(),
        );
        let settlement_bad = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tollgate_settlement_bad_entries",
            "Access-log entries whose charge was refused, by reason (signature, malformed, stale, cost_header); never applied",
            settlement_bad.clone(),
        );
        let settlement_units = Family::<KindLabels, Counter>::default();
        registry.register(
            "tollgate_settlement_units",
            "Units moved by settlement: refunded (given back), overage (charged beyond the reservation), unpaid (overage the credit balance could not cover)",
            settlement_units.clone(),
        );
        let events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_events",
            "Usage and threshold events by result: queued (put in the outbox by this replica), delivered (the sink took them), retried (a POST failed; they stay queued), dropped (the outbox was full)",
            events.clone(),
        );
        let event_lag = Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]);
        registry.register(
            "tollgate_event_delivery_lag_seconds",
            "From an event's time (its request's Check, or its threshold crossing) to its delivery to the sink",
            event_lag.clone(),
        );
        let shadow = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "tollgate_shadow_decisions",
            "Decisions made under shadow mode (Checks and Authorize calls, dry runs aside), by the status and code they would have had; every one was allowed unless the code is enforced in shadow mode (credentials, blocked, route, request, store)",
            shadow.clone(),
        );
        let overage = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "tollgate_overage_units",
            "Units spent past a soft quota's limit, by policy (requests-month)",
            overage.clone(),
        );
        let plan_decisions = Family::<PlanLabels, Counter>::default();
        registry.register(
            "tollgate_plan_decisions",
            "Checks by the caller's plan (plans the config defines) and HTTP status: the 402 share per plan",
            plan_decisions.clone(),
        );
        let doors = Family::<DoorLabels, Counter>::default();
        registry.register(
            "tollgate_door_decisions",
            "Checks by the door they came in by (grpc: Envoy's gRPC ext_authz; envoy_http: Envoy's HTTP ext_authz; traefik: ForwardAuth) and HTTP status",
            doors.clone(),
        );
        let spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_trace_spans",
            "Trace spans by result: exported (the collector took them), dropped (the export queue was full), failed (the collector did not take their batch); all 0 while tracing is off",
            spans.clone(),
        );
        for result in ["exported", "dropped", "failed"] {
            let _ = spans.get_or_create(&ResultLabels { result });
        }
        let webhooks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_webhooks",
            "Stripe webhook deliveries by result: applied, ignored (replay, unknown account, older, other type), signature (refused: bad or missing signature), rejected (refused: bad body), unavailable (store error; Stripe retries)",
            webhooks.clone(),
        );
        for result in WEBHOOK_RESULTS {
            let _ = webhooks.get_or_create(&ResultLabels { result });
        }
        let ready = Gauge::default();
        registry.register(
            "tollgate_ready",
            "1 while this replica is ready (its store answers), 0 otherwise: what /readyz and gRPC health say",
            ready.clone(),
        );
        let x402 = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_x402_payments",
            "x402: 402s sent with a challenge, and paid retries by result (settled, malformed, replayed, invalid, not_settled, unavailable)",
            x402.clone(),
        );
        for result in X402_RESULTS {
            let _ = x402.get_or_create(&ResultLabels { result });
        }
        let x402_amount = Family::<AssetLabels, Counter>::default();
        registry.register(
            "tollgate_x402_settled_amount",
            "x402: atomic units of the asset settled to pay_to, by network and asset",
            x402_amount.clone(),
        );
        for result in ["queued", "delivered", "retried", "dropped"] {
            let _ = events.get_or_create(&ResultLabels { result });
        }
        for result in SETTLEMENT_RESULTS {
            let _ = settlements.get_or_create(&ResultLabels { result });
        }
        for reason in crate::settlement::Bad::ALL {
            let _ = settlement_bad.get_or_create(&ReasonLabels { reason: reason.as_str() });
        }
        for kind in ["refunded", "overage", "unpaid"] {
            let _ = settlement_units.get_or_create(&KindLabels { kind });
        }
        // Export every series from the start, so dashboards and alerts see 0, not "no data".
        let cache_hits = cache_requests.get_or_create(&ResultLabels { result: "hit" }).clone();
        let cache_misses = cache_requests.get_or_create(&ResultLabels { result: "miss" }).clone();
        for result in ["ok", "error"] {
            let _ = config_reloads.get_or_create(&ResultLabels { result });
        }
        Self {
            registry,
            decisions,
            decision_counters: std::array::from_fn(|_| std::sync::OnceLock::new()),
            check_duration,
            cache_hits,
            cache_misses,
            cache_hit_ratio,
            store_duration,
            store_errors,
            config_reloads,
            auth_failures,
            lease,
            settlements,
            settlement_bad,
            settlement_units,
            events,
            event_lag,
            shadow,
            overage,
            plan_decisions,
            plan_counters: arc_swap::ArcSwap::default(),
            plan_counters_write: std::sync::Mutex::new(()),
            doors,
            door_counters: std::array::from_fn(|_| std::array::from_fn(|_| std::sync::OnceLock::new())),
            spans,
            copying: std::sync::Mutex::new(()),
            webhooks,
            x402,
            x402_amount,
            ready,
        }
    }

    /// Copies lease mode's totals into the exported series (at scrape time).
    pub fn record_lease(&self, t: LeaseTotals) {
        let _one_at_a_time = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        catch_up(&self.lease.events.get_or_create(&ResultLabels { result: "taken" }), t.taken);
        catch_up(&self.lease.events.get_or_create(&ResultLabels { result: "returned" }), t.returned);
        catch_up(&self.lease.events.get_or_create(&ResultLabels { result: "expired" }), t.expired);
        catch_up(&self.lease.spends, t.spends);
        catch_up(&self.lease.redis_calls, t.redis_calls);
        self.lease.outstanding.set(i64::try_from(t.outstanding).unwrap_or(i64::MAX));
    }

    /// Counts one settlement by result (one of [`SETTLEMENT_RESULTS`]).
    pub fn record_settlement(&self, result: &'static str) {
        self.settlements.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts an access-log entry whose charge was refused.
    pub fn record_bad_entry(&self, reason: crate::settlement::Bad) {
        self.record_settlement("bad");
        self.settlement_bad.get_or_create(&ReasonLabels { reason: reason.as_str() }).inc();
    }

    /// Counts units settlement moved (`refunded`, `overage`, `unpaid`).
    pub fn record_settled_units(&self, kind: &'static str, units: u64) {
        if units > 0 {
            self.settlement_units.get_or_create(&KindLabels { kind }).inc_by(units);
        }
    }

    /// Counts events by result (`queued`, `delivered`, `retried`, `dropped`).
    pub fn record_events(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.events.get_or_create(&ResultLabels { result }).inc_by(n);
        }
    }

    /// Observes one delivered event's lag.
    pub fn record_event_lag(&self, lag: Duration) {
        self.event_lag.observe(lag.as_secs_f64());
    }

    /// Counts a `tollgate.v1` call refused for its token (`missing` or `invalid`).
    pub fn record_auth_failure(&self, rpc: &'static str, reason: &'static str) {
        self.auth_failures.get_or_create(&AuthLabels { rpc, reason }).inc();
    }

    /// Counts one Check and its latency.
    pub fn record_decision(&self, verdict: Verdict, elapsed: Duration) {
        self.decision_counters[verdict_index(verdict)]
            .get_or_init(|| {
                let labels = DecisionLabels { status: status_label(verdict.http_status()), code: verdict.label() };
                self.decisions.get_or_create(&labels).clone()
            })
            .inc();
        self.check_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one decision made under shadow mode, by what it would have been.
    pub fn record_shadow(&self, would_be: Verdict) {
        self.shadow
            .get_or_create(&DecisionLabels { status: status_label(would_be.http_status()), code: would_be.label() })
            .inc();
    }

    /// Counts one Check by the door it came in by (`grpc`, `envoy_http`, `traefik`).
    pub fn record_door(&self, door: &'static str, status: u16) {
        let status = status_label(status);
        let at = DOORS.iter().position(|d| *d == door).zip(STATUSES.iter().position(|s| *s == status));
        match at {
            Some((d, s)) => {
                self.door_counters[d][s]
                    .get_or_init(|| self.doors.get_or_create(&DoorLabels { door, status }).clone())
                    .inc();
            }
            None => {
                self.doors.get_or_create(&DoorLabels { door, status }).inc();
            }
        }
    }

    /// Counts one Check of an account on `plan` (a plan the config defines).
    pub fn record_plan_decision(&self, plan: &str, verdict: Verdict) {
        let status = status_label(verdict.http_status());
        let find = |m: &PlanCounters| {
            m.get(plan).and_then(|s| s.iter().find(|(st, _)| *st == status)).map(|(_, c)| c.inc()).is_some()
        };
        if find(&self.plan_counters.load()) {
            return;
        }
        // First time for this plan and status: the label is built once.
        let _writing = self.plan_counters_write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.plan_counters.load_full();
        if !find(&current) {
            let c = self.plan_decisions.get_or_create(&PlanLabels { plan: plan.to_owned(), status }).clone();
            c.inc();
            let mut m = PlanCounters::clone(&current);
            m.entry(plan.to_owned()).or_default().push((status, c));
            self.plan_counters.store(Arc::new(m));
        }
    }

    /// Copies the span totals into the exported series (at scrape time).
    pub fn record_traces(&self, t: crate::telemetry::Totals) {
        let _one_at_a_time = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        for (result, n) in [("exported", t.exported), ("dropped", t.dropped), ("failed", t.failed)] {
            catch_up(&self.spans.get_or_create(&ResultLabels { result }), n);
        }
    }

    /// Counts one Stripe webhook delivery by result (one of [`WEBHOOK_RESULTS`]).
    pub fn record_webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts an x402 event (one of [`X402_RESULTS`]).
    pub fn record_x402(&self, result: &'static str) {
        self.x402.get_or_create(&ResultLabels { result }).inc();
    }

    /// Adds a settled x402 payment's amount.
    pub fn record_x402_amount(&self, network: &str, asset: &str, amount: u64) {
        let labels = AssetLabels { network: network.to_owned(), asset: asset.to_owned() };
        self.x402_amount.get_or_create(&labels).inc_by(amount);
    }

    /// Whether this replica is ready (the store answers).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Counts units spent past a soft quota's limit.
    pub fn record_overage(&self, policy: String, units: u64) {
        self.overage.get_or_create(&PolicyLabels { policy }).inc_by(units);
    }

    /// The cache-lookup observer `store::open` takes (a `store::LookupObserver`):
    /// it counts each lookup here as a hit or a miss. The type is spelled out
    /// so that this module keeps depending on nothing of ours but `decision`.
    pub fn cache_observer(self: &Arc<Self>) -> Arc<dyn Fn(bool) + Send + Sync> {
        let metrics = Arc::clone(self);
        Arc::new(move |hit| metrics.record_cache(hit))
    }

    /// Counts a cache lookup (the hit ratio is worked out when scraped: one
    /// shared write fewer on every lookup).
    pub fn record_cache(&self, hit: bool) {
        crate::telemetry::note_cache(hit);
        if hit {
            self.cache_hits.inc()
        } else {
            self.cache_misses.inc()
        };
    }

    /// Times a store call.
    pub fn record_store_call(&self, elapsed: Duration) {
        self.store_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed store call.
    pub fn record_store_error(&self) {
        self.store_errors.inc();
    }

    /// Counts a config reload (`ok` or `error`).
    pub fn record_reload(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The text exposition for `/metrics`.
    pub fn encode(&self) -> String {
        let (hits, misses) = (self.cache_hits.get(), self.cache_misses.get());
        self.cache_hit_ratio.set(hits as f64 / hits.saturating_add(misses).max(1) as f64);
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{AllowKind, Code};

    #[test]
    fn names_match_the_spec() {
        let m = Arc::new(Metrics::new());
        m.record_decision(Verdict::Deny(Code::QuotaExhausted), Duration::from_micros(30));
        m.record_decision(Verdict::Allow(AllowKind::Allowed), Duration::from_micros(30));
        let observe = m.cache_observer();
        observe(true);
        observe(false);
        observe(true);
        m.record_store_call(Duration::from_micros(300));
        m.record_store_error();
        m.record_reload("ok");
        m.record_auth_failure("PutEntitlement", "invalid");
        m.record_shadow(Verdict::Deny(Code::QuotaExhausted));
        m.record_overage("requests-month".into(), 3);
        m.record_plan_decision("free", Verdict::Deny(Code::QuotaExhausted));
        m.record_webhook("signature");
        m.set_ready(true);
        let text = m.encode();
        for needle in [
            "tollgate_decisions_total{status=\"402\",code=\"quota_exhausted\"} 1",
            "tollgate_decisions_total{status=\"200\",code=\"allowed\"} 1",
            "tollgate_check_duration_seconds_bucket{le=\"0.00005\"} 2",
            "tollgate_cache_requests_total{result=\"hit\"} 2",
            "tollgate_cache_hit_ratio 0.6666",
            "tollgate_store_duration_seconds_count 1",
            "tollgate_store_errors_total 1",
            "tollgate_config_reloads_total{result=\"ok\"} 1",
            "tollgate_auth_failures_total{rpc=\"PutEntitlement\",reason=\"invalid\"} 1",
            "tollgate_shadow_decisions_total{status=\"402\",code=\"quota_exhausted\"} 1",
            "tollgate_overage_units_total{policy=\"requests-month\"} 3",
            "tollgate_plan_decisions_total{plan=\"free\",status=\"402\"} 1",
            "tollgate_webhooks_total{result=\"signature\"} 1",
            "tollgate_webhooks_total{result=\"applied\"} 0",
            "tollgate_ready 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn totals_copied_by_scrapes_at_once_are_counted_once() {
        let m = Arc::new(Metrics::new());
        let t = crate::telemetry::Totals { exported: 1000, dropped: 7, failed: 3 };
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        m.record_traces(t);
                        m.record_lease(LeaseTotals { taken: 5, ..LeaseTotals::default() });
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let text = m.encode();
        for needle in [
            "tollgate_trace_spans_total{result=\"exported\"} 1000",
            "tollgate_trace_spans_total{result=\"dropped\"} 7",
            "tollgate_leases_total{result=\"taken\"} 5",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn lease_totals_are_copied_not_added_twice() {
        let m = Metrics::new();
        let t = LeaseTotals { taken: 3, returned: 1, expired: 2, outstanding: 40, spends: 100, redis_calls: 4 };
        m.record_lease(t);
        m.record_lease(t);
        m.record_lease(LeaseTotals { outstanding: 7, ..t });
        let text = m.encode();
        for needle in [
            "tollgate_leases_total{result=\"taken\"} 3",
            "tollgate_leases_total{result=\"returned\"} 1",
            "tollgate_leases_total{result=\"expired\"} 2",
            "tollgate_lease_units_outstanding 7",
            "tollgate_lease_spends_total 100",
            "tollgate_lease_redis_calls_total 4",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn plan_counts_from_racing_workers_are_all_kept() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        // New series appear while others count: none is lost to a replaced map.
                        let plan = ["free", "pro", "team", "enterprise"][(t + i) % 4];
                        let verdict = if i % 3 == 0 {
                            Verdict::Deny(Code::QuotaExhausted)
                        } else {
                            Verdict::Allow(AllowKind::Allowed)
                        };
                        m.record_plan_decision(plan, verdict);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recording thread");
        }
        let text = m.encode();
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("tollgate_plan_decisions_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(total, 4_000, "in\n{text}");
    }
}

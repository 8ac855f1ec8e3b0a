//! `tollgate.v1.Tollgate`: decisions for internal services without Envoy, and
//! the control plane (entitlements, credits, keys, usage).
//!
//! Who may call what (SPEC §10): mutating calls need an admin token
//! (`authorization: Bearer <token>`); `Authorize` that names an account
//! directly or spends needs an admin or a service token (a service token can
//! do nothing else); `Authorize` with an API key and `dry_run` is open, like
//! a Check: the key is the credential. Tokens are compared in constant time
//! against every configured one, so rotation is "add the new, deploy, remove
//! the old"; every refusal is logged (never with the token) and counted in
//! `tollgate_auth_failures_total`. Inputs are bounded and validated here,
//! before any store lookup, and answered INVALID_ARGUMENT naming the field.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use super::pb::authorize_request::{Subject as PbSubject, Target as PbTarget};
use super::pb::tollgate_server::Tollgate;
use super::pb::{
    AccountRequest, AddCreditsRequest, ApiKeyInfo, AuthorizeRequest, AuthorizeResponse, CreateApiKeyRequest,
    CreateApiKeyResponse, CreditsResponse, Entitlement, ListApiKeysResponse, PutEntitlementRequest, QuotaOverride,
    QuotaState, RevokeApiKeyRequest, RevokeApiKeyResponse, SetCreditsRequest, UsageRequest, UsageResponse,
};
use crate::authorizer::{Ask, Authorizer, Query, Subject};
use crate::bounds;
use crate::config::{Config, ReadAccess};
use crate::entitlement::{self, Account, Period, Quota, Window};
use crate::identity::{Credentials, KeyHash, KeyMeta};
use crate::route::RouteKey;
use crate::store::StoreError;
use crate::usage::{MAX_COST, MAX_CREDITS, MAX_LIMIT, Spend};

/// The internal API service.
#[derive(Debug, Clone)]
pub struct Api {
    authorizer: Arc<Authorizer>,
}

impl Api {
    /// A service answering from `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

/// `Authorize` names its subject directly; no request headers are read.
struct NoCredentials;

impl Credentials for NoCredentials {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn claim(&self, _: &str, _: &str, _: &str) -> Option<String> {
        None
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn from_timestamp(t: &prost_types::Timestamp, field: &str) -> Result<chrono::DateTime<chrono::Utc>, Status> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: out of range")))
}

fn store_status(e: StoreError) -> Status {
    tracing::warn!(error = %e, "store call failed in the internal API");
    match e {
        StoreError::Corrupt(_) => Status::internal("stored data could not be read"),
        _ => Status::unavailable("the store is unavailable; retry"),
    }
}

fn quota_state(q: &crate::decision::QuotaState) -> QuotaState {
    QuotaState {
        meter: q.quota.meter.clone(),
        policy: q.quota.policy_name(),
        limit: q.quota.limit,
        used: q.used,
        remaining: q.remaining,
        resets_at: Some(timestamp(q.resets_at)),
        rate: q.quota.window.is_rate(),
    }
}

/// What a presented token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything.
    Admin,
    /// `Authorize` by account id or with spending.
    Service,
}

/// The bearer token of `authorization: Bearer <token>`, or "".
fn bearer(metadata: &tonic::metadata::MetadataMap) -> &str {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim())
        })
        .unwrap_or("")
}

/// Constant-time comparison of `presented` against every token of `tokens`.
fn matches_any(tokens: &[String], presented: &str) -> bool {
    let mut ok = subtle::Choice::from(0u8);
    for token in tokens {
        // `ct_eq` on slices of different lengths is false without looking at contents.
        ok |= token.as_bytes().ct_eq(presented.as_bytes());
    }
    !presented.is_empty() && bool::from(ok)
}

/// The scope of the token presented in `metadata`, if it is a configured one.
fn scope(config: &Config, metadata: &tonic::metadata::MetadataMap) -> Option<Scope> {
    let presented = bearer(metadata);
    if matches_any(&config.server.admin_tokens.0, presented) {
        Some(Scope::Admin)
    } else if matches_any(&config.server.service_tokens.0, presented) {
        Some(Scope::Service)
    } else {
        None
    }
}

/// An optional name (empty allowed): at most 128 bytes, no control characters.
fn name(value: &str, field: &str) -> Result<(), Status> {
    if !value.is_empty() && !bounds::is_valid_name(value) {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {} bytes, no control characters",
            bounds::MAX_NAME
        )));
    }
    Ok(())
}

/// A plan, meter or feature name that must be there: 1–128 bytes, no control characters.
fn required_name(value: &str, field: &str) -> Result<(), Status> {
    if !bounds::is_valid_name(value) {
        return Err(Status::invalid_argument(format!("{field}: 1-{} bytes, no control characters", bounds::MAX_NAME)));
    }
    Ok(())
}

/// A timestamp inside what every way in accepts (1970 to 9999).
fn bounded_time(t: &prost_types::Timestamp, field: &str) -> Result<chrono::DateTime<chrono::Utc>, Status> {
    from_timestamp(t, field)
        .ok()
        .filter(|t| entitlement::is_valid_time(*t))
        .ok_or_else(|| Status::invalid_argument(format!("{field}: must be between 1970-01-01 and 9999-12-31")))
}

fn account_id(id: &str, field: &str) -> Result<(), Status> {
    if entitlement::is_valid_account_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("{field}: must be 1-128 of A-Z a-z 0-9 _ - . : @")))
    }
}

/// Reads an override off the wire, checking what config validation checks.
fn quota_override(q: &QuotaOverride, field: &str) -> Result<Quota, Status> {
    if q.meter.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field}.meter: required")));
    }
    required_name(&q.meter, &format!("{field}.meter"))?;
    if q.limit == 0 || q.limit > MAX_LIMIT {
        return Err(Status::invalid_argument(format!("{field}.limit: must be between 1 and {MAX_LIMIT}")));
    }
    let window =
        match (q.period.as_str(), &q.per) {
            ("", Some(per)) => {
                let d = Duration::try_from(*per).ok().filter(|d| bounds::is_valid_window(*d));
                Window::Rolling(
                    d.ok_or_else(|| Status::invalid_argument(format!("{field}.per: must be between 1ms and 366d")))?,
                )
            }
            (p, None) => Window::Calendar(Period::parse(p).ok_or_else(|| {
                Status::invalid_argument(format!("{field}.period: minute|hour|day|month, or set per"))
            })?),
            (_, Some(_)) => return Err(Status::invalid_argument(format!("{field}: set period or per, not both"))),
        };
    Ok(Quota { meter: q.meter.clone(), limit: q.limit, window })
}

fn entitlement_of(a: &Account, credits: u64) -> Entitlement {
    Entitlement {
        account_id: a.id.clone(),
        plan: a.plan.clone(),
        status: a.status.as_str().to_owned(),
        past_due_since: a.past_due_since.map(timestamp),
        expires_at: a.expires_at.map(timestamp),
        blocked: a.blocked,
        extra_features: a.extra_features.iter().cloned().collect(),
        quota_overrides: a
            .quota_overrides
            .iter()
            .map(|q| QuotaOverride {
                meter: q.meter.clone(),
                limit: q.limit,
                period: match q.window {
                    Window::Calendar(p) => p.as_str().to_owned(),
                    Window::Rolling(_) => String::new(),
                },
                per: match q.window {
                    Window::Rolling(d) => prost_types::Duration::try_from(d).ok(),
                    Window::Calendar(_) => None,
                },
            })
            .collect(),
        stripe_customer: a.stripe_customer.clone().unwrap_or_default(),
        credits,
    }
}

/// A new API key: `tg_` and 40 hex digits from the OS's CSPRNG.
fn new_api_key() -> Result<String, Status> {
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|_| Status::internal("no randomness available"))?;
    Ok(format!("tg_{}", hex::encode(bytes)))
}

impl Api {
    /// Logs and counts a refused call, never with the token.
    fn refuse<T>(&self, rpc: &'static str, req: &Request<T>, needs: &str) -> Status {
        let reason = if bearer(req.metadata()).is_empty() { "missing" } else { "invalid" };
        self.authorizer.metrics().record_auth_failure(rpc, reason);
        tracing::warn!(rpc, reason, peer = ?req.remote_addr(), "tollgate.v1 call refused: token {reason}");
        Status::unauthenticated(format!("this call needs authorization: Bearer <{needs}>"))
    }

    fn require_admin<T>(&self, rpc: &'static str, req: &Request<T>) -> Result<(), Status> {
        match scope(&self.authorizer.config(), req.metadata()) {
            Some(Scope::Admin) => Ok(()),
            _ => Err(self.refuse(rpc, req, "admin token")),
        }
    }

    fn require_service<T>(&self, rpc: &'static str, req: &Request<T>) -> Result<(), Status> {
        match scope(&self.authorizer.config(), req.metadata()) {
            Some(_) => Ok(()),
            None => Err(self.refuse(rpc, req, "admin or service token")),
        }
    }

    fn require_read<T>(&self, rpc: &'static str, req: &Request<T>) -> Result<(), Status> {
        let config = self.authorizer.config();
        if config.server.read_access == ReadAccess::Open || scope(&config, req.metadata()) == Some(Scope::Admin) {
            Ok(())
        } else {
            // `server.read_access: token` (the default) keeps account state behind the admin token.
            Err(self.refuse(rpc, req, "admin token"))
        }
    }

    async fn load(&self, id: &str) -> Result<Account, Status> {
        account_id(id, "account_id")?;
        let store = self.authorizer.store();
        match store.account(id).await.map_err(store_status)? {
            Some(a) => Ok((*a).clone()),
            None => Err(Status::not_found(format!("account {id:?} does not exist"))),
        }
    }

    async fn entitlement(&self, a: &Account) -> Result<Response<Entitlement>, Status> {
        let credits = self.authorizer.store().credits(&a.id).await.map_err(store_status)?;
        Ok(Response::new(entitlement_of(a, credits)))
    }

    async fn set_blocked(&self, req: Request<AccountRequest>, blocked: bool) -> Result<Response<Entitlement>, Status> {
        self.require_admin(if blocked { "BlockAccount" } else { "UnblockAccount" }, &req)?;
        let mut a = self.load(&req.get_ref().account_id).await?;
        a.blocked = blocked;
        self.authorizer.store().put_account(&a).await.map_err(store_status)?;
        tracing::info!(account = %a.id, blocked, "account block changed");
        self.entitlement(&a).await
    }

    /// The account's quotas (optionally of one meter) in their current windows.
    async fn usage(&self, a: &Account, meter: &str) -> Result<Response<UsageResponse>, Status> {
        let config = self.authorizer.config();
        let Some(plan) = config.policy.plans.get(&a.plan) else {
            return Err(Status::failed_precondition(format!("plan {:?} is not configured", a.plan)));
        };
        let quotas: Vec<Quota> =
            a.all_quotas(plan).into_iter().filter(|q| meter.is_empty() || q.meter == meter).collect();
        let spend = Spend {
            account: a.id.clone(),
            quotas: quotas.clone(),
            cost: 0,
            credits: plan.prepaid.then_some(0),
            now: Utc::now(),
            dry_run: true,
        };
        let answer = self.authorizer.store().spend(&spend).await.map_err(store_status)?;
        let states = quotas
            .iter()
            .zip(&answer.quotas)
            .map(|(q, u)| {
                quota_state(&crate::decision::QuotaState {
                    quota: q.clone(),
                    used: u.used,
                    remaining: q.limit.saturating_sub(u.used),
                    resets_at: u.resets_at,
                    retry_at: u.retry_at,
                })
            })
            .collect();
        Ok(Response::new(UsageResponse {
            account_id: a.id.clone(),
            plan: a.plan.clone(),
            quotas: states,
            credits: answer.credits.map(|c| c.balance),
        }))
    }
}

#[tonic::async_trait]
impl Tollgate for Api {
    async fn authorize(&self, request: Request<AuthorizeRequest>) -> Result<Response<AuthorizeResponse>, Status> {
        // Naming an account, or spending, needs a token: only an API key
        // proves the caller may see or use an account, and a dry run with it
        // reveals no more than a Check with the same key would.
        let by_account = matches!(request.get_ref().subject, Some(PbSubject::AccountId(_)));
        if by_account || !request.get_ref().dry_run {
            self.require_service("Authorize", &request)?;
        }
        let req = request.into_inner();
        let subject = match &req.subject {
            Some(PbSubject::AccountId(id)) if !id.is_empty() => {
                account_id(id, "account_id")?;
                Subject::AccountId(id)
            }
            Some(PbSubject::ApiKey(key)) if !key.is_empty() => {
                if !crate::identity::is_valid_key(key) {
                    return Err(Status::invalid_argument(format!(
                        "api_key: must be 1-{} visible ASCII characters",
                        crate::identity::MAX_KEY_BYTES
                    )));
                }
                Subject::ApiKey(key)
            }
            _ => return Err(Status::invalid_argument("subject: set account_id or api_key")),
        };
        if req.cost > MAX_COST {
            return Err(Status::invalid_argument(format!("cost: must be at most {MAX_COST}")));
        }
        let ask = match &req.target {
            Some(PbTarget::Route(r)) => {
                if !r.path.starts_with('/') {
                    return Err(Status::invalid_argument("route.path: must start with /"));
                }
                name(&r.method, "route.method")?;
                if r.host.len() > 255 {
                    return Err(Status::invalid_argument("route.host: at most 255 bytes"));
                }
                Ask::Http(RouteKey { path: &r.path, method: &r.method, host: &r.host })
            }
            Some(PbTarget::Feature(f)) => {
                name(&f.feature, "feature.feature")?;
                name(&f.meter, "feature.meter")?;
                Ask::Feature {
                    feature: Some(f.feature.as_str()).filter(|s| !s.is_empty()),
                    meter: Some(f.meter.as_str()).filter(|s| !s.is_empty()),
                }
            }
            None => return Err(Status::invalid_argument("target: set feature or route")),
        };
        let query = Query::<NoCredentials> {
            subject,
            ask,
            cost: Some(req.cost).filter(|c| *c > 0),
            dry_run: req.dry_run,
            peer_verified: false,
        };
        let outcome = self.authorizer.authorize(query).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let d = &outcome.decision;
        Ok(Response::new(AuthorizeResponse {
            allowed: d.is_allowed(),
            http_status: u32::from(d.verdict.http_status()),
            code: d.verdict.label().to_owned(),
            account_id: d.account.clone().unwrap_or_default(),
            plan: d.plan.clone().unwrap_or_default(),
            problem_json: outcome.response.body.clone().unwrap_or_default(),
            quotas: d.quotas.iter().map(quota_state).collect(),
            credits_remaining: d.credits,
            headers: outcome.response.client_headers.iter().cloned().collect(),
        }))
    }

    async fn get_entitlement(&self, req: Request<AccountRequest>) -> Result<Response<Entitlement>, Status> {
        self.require_read("GetEntitlement", &req)?;
        let a = self.load(&req.get_ref().account_id).await?;
        self.entitlement(&a).await
    }

    async fn put_entitlement(&self, req: Request<PutEntitlementRequest>) -> Result<Response<Entitlement>, Status> {
        self.require_admin("PutEntitlement", &req)?;
        let e = req.into_inner().entitlement.ok_or_else(|| Status::invalid_argument("entitlement: required"))?;
        account_id(&e.account_id, "entitlement.account_id")?;
        let config = self.authorizer.config();
        if !config.policy.plans.contains_key(&e.plan) {
            let mut known: Vec<&str> = config.policy.plans.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(Status::invalid_argument(format!(
                "entitlement.plan: unknown plan {:?} (known: {})",
                e.plan,
                known.join(", ")
            )));
        }
        let status = match e.status.as_str() {
            "" => entitlement::Status::Active,
            s => entitlement::Status::parse(s).ok_or_else(|| {
                Status::invalid_argument(
                    "entitlement.status: active|trialing|past_due|canceled|unpaid|expired|paused".to_string(),
                )
            })?,
        };
        let past_due_since =
            e.past_due_since.as_ref().map(|t| bounded_time(t, "entitlement.past_due_since")).transpose()?;
        if status == entitlement::Status::PastDue && past_due_since.is_none() {
            return Err(Status::invalid_argument("entitlement.past_due_since: required when status is past_due"));
        }
        required_name(&e.plan, "entitlement.plan")?;
        if !e.stripe_customer.is_empty() && !bounds::is_valid_customer_id(&e.stripe_customer) {
            return Err(Status::invalid_argument("entitlement.stripe_customer: 1-255 of A-Z a-z 0-9 _"));
        }
        if e.extra_features.len() > 256 || e.quota_overrides.len() > 256 {
            return Err(Status::invalid_argument("entitlement: at most 256 extra_features and 256 quota_overrides"));
        }
        for (i, f) in e.extra_features.iter().enumerate() {
            required_name(f, &format!("entitlement.extra_features[{i}]"))?;
        }
        let mut quota_overrides = Vec::with_capacity(e.quota_overrides.len());
        for (i, q) in e.quota_overrides.iter().enumerate() {
            let q = quota_override(q, &format!("entitlement.quota_overrides[{i}]"))?;
            if quota_overrides.iter().any(|o: &Quota| o.meter == q.meter && o.window == q.window) {
                return Err(Status::invalid_argument(format!(
                    "entitlement.quota_overrides[{i}]: duplicate quota {}",
                    q.policy_name()
                )));
            }
            quota_overrides.push(q);
        }
        let store = self.authorizer.store();
        let previous = store.account(&e.account_id).await.map_err(store_status)?;
        let account = Account {
            id: e.account_id.clone(),
            plan: e.plan,
            status,
            past_due_since,
            expires_at: e.expires_at.as_ref().map(|t| bounded_time(t, "entitlement.expires_at")).transpose()?,
            blocked: e.blocked,
            extra_features: e.extra_features.into_iter().filter(|f| !f.trim().is_empty()).collect(),
            quota_overrides,
            stripe_customer: Some(e.stripe_customer).filter(|c| !c.is_empty()),
            billing_event_at: previous.and_then(|p| p.billing_event_at),
        };
        store.put_account(&account).await.map_err(store_status)?;
        tracing::info!(account = %account.id, plan = %account.plan, status = %account.status, "entitlement put");
        self.entitlement(&account).await
    }

    async fn block_account(&self, req: Request<AccountRequest>) -> Result<Response<Entitlement>, Status> {
        self.set_blocked(req, true).await
    }

    async fn unblock_account(&self, req: Request<AccountRequest>) -> Result<Response<Entitlement>, Status> {
        self.set_blocked(req, false).await
    }

    async fn set_credits(&self, req: Request<SetCreditsRequest>) -> Result<Response<CreditsResponse>, Status> {
        self.require_admin("SetCredits", &req)?;
        let r = req.into_inner();
        if r.credits > MAX_CREDITS {
            return Err(Status::invalid_argument(format!("credits: must be at most {MAX_CREDITS}")));
        }
        let a = self.load(&r.account_id).await?;
        self.authorizer.store().set_credits(&a.id, r.credits).await.map_err(store_status)?;
        Ok(Response::new(CreditsResponse { account_id: a.id, credits: r.credits }))
    }

    async fn add_credits(&self, req: Request<AddCreditsRequest>) -> Result<Response<CreditsResponse>, Status> {
        self.require_admin("AddCredits", &req)?;
        let r = req.into_inner();
        if r.delta.unsigned_abs() > MAX_CREDITS {
            return Err(Status::invalid_argument(format!("delta: must be within ±{MAX_CREDITS}")));
        }
        let a = self.load(&r.account_id).await?;
        match self.authorizer.store().add_credits(&a.id, r.delta).await.map_err(store_status)? {
            Some(credits) => Ok(Response::new(CreditsResponse { account_id: a.id, credits })),
            None => Err(Status::failed_precondition(format!(
                "delta: the balance would go below zero or above {MAX_CREDITS}; nothing changed"
            ))),
        }
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        self.require_admin("CreateApiKey", &req)?;
        let r = req.into_inner();
        name(&r.name, "name")?;
        let a = self.load(&r.account_id).await?;
        let key = new_api_key()?;
        let hash = KeyHash::of(&key);
        let meta = KeyMeta::for_key(&key, 11, &r.name, Utc::now());
        self.authorizer.store().put_key(&hash, &a.id, &meta).await.map_err(store_status)?;
        tracing::info!(account = %a.id, key_id = %hash.to_hex(), "API key created");
        Ok(Response::new(CreateApiKeyResponse { api_key: key, key: Some(key_info(&hash, &meta)) }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        self.require_admin("RevokeApiKey", &req)?;
        let r = req.into_inner();
        account_id(&r.account_id, "account_id")?;
        let hash = KeyHash::from_hex(&r.key_id)
            .ok_or_else(|| Status::invalid_argument("key_id: must be the key's SHA-256 as 64 hex digits"))?;
        let revoked = self.authorizer.store().revoke_key(&r.account_id, &hash).await.map_err(store_status)?;
        tracing::info!(account = %r.account_id, key_id = %r.key_id, revoked, "API key revoked");
        Ok(Response::new(RevokeApiKeyResponse { revoked }))
    }

    async fn list_api_keys(&self, req: Request<AccountRequest>) -> Result<Response<ListApiKeysResponse>, Status> {
        self.require_read("ListApiKeys", &req)?;
        let id = &req.get_ref().account_id;
        account_id(id, "account_id")?;
        let keys = self.authorizer.store().list_keys(id).await.map_err(store_status)?;
        Ok(Response::new(ListApiKeysResponse { keys: keys.iter().map(|(h, m)| key_info(h, m)).collect() }))
    }

    async fn get_usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        self.require_read("GetUsage", &req)?;
        name(&req.get_ref().meter, "meter")?;
        let a = self.load(&req.get_ref().account_id).await?;
        self.usage(&a, &req.get_ref().meter).await
    }

    async fn reset_usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        self.require_admin("ResetUsage", &req)?;
        name(&req.get_ref().meter, "meter")?;
        let r = req.into_inner();
        let a = self.load(&r.account_id).await?;
        let config = self.authorizer.config();
        let plan = config
            .policy
            .plans
            .get(&a.plan)
            .ok_or_else(|| Status::failed_precondition(format!("plan {:?} is not configured", a.plan)))?;
        let quotas: Vec<Quota> =
            a.all_quotas(plan).into_iter().filter(|q| r.meter.is_empty() || q.meter == r.meter).collect();
        self.authorizer.store().reset_usage(&a.id, &quotas, Utc::now()).await.map_err(store_status)?;
        tracing::info!(account = %a.id, meter = %r.meter, "usage reset");
        self.usage(&a, &r.meter).await
    }
}

fn key_info(hash: &KeyHash, meta: &KeyMeta) -> ApiKeyInfo {
    ApiKeyInfo {
        id: hash.to_hex(),
        prefix: meta.prefix.clone(),
        name: meta.name.clone(),
        created_at: Some(timestamp(meta.created_at)),
    }
}

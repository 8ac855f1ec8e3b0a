//! `tollgate.v1.Tollgate`: decisions for internal services without Envoy, and
//! the control plane (entitlements, credits, keys, usage).
//!
//! Translation only: each RPC checks who may call it, turns the message into
//! domain terms, makes one call (`Authorize` into the [`Authorizer`], the
//! rest into the [`Accounts`] service, which checks every input before any
//! store call), and turns the answer, or the error through [`super::status`],
//! back into protobuf.
//!
//! Who may call what (SPEC §10): mutating calls need an admin token
//! (`authorization: Bearer <token>`); `Authorize` that names an account
//! directly or spends needs an admin or a service token (a service token can
//! do nothing else); `Authorize` with an API key and `dry_run` is open, like
//! a Check: the key is the credential. Tokens are compared in constant time
//! against every configured one, so rotation is "add the new, deploy, remove
//! the old"; every refusal is logged (never with the token) and counted in
//! `tollgate_auth_failures_total`.
//!
//! May use: `authorizer`, `accounts`, `config` (tokens, read access),
//! `decision` (quota state), `identity`, `route`, `usage` (bounds).

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::Either;
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::pb::authorize_request::{Subject as PbSubject, Target as PbTarget};
use super::pb::tollgate_server::Tollgate;
use super::pb::{
    AccountRequest, AddCreditsRequest, ApiKeyInfo, AuthorizeRequest, AuthorizeResponse, CreateApiKeyRequest,
    CreateApiKeyResponse, CreditsResponse, Entitlement, ListApiKeysResponse, PutEntitlementRequest, QuotaOverride,
    QuotaState, RevokeApiKeyRequest, RevokeApiKeyResponse, SetCreditsRequest, UsageRequest, UsageResponse,
};
use crate::accounts::{
    AccountState, Accounts, EntitlementEdit, Invalid, QuotaEdit, Usage, check_account_id, check_optional_name,
};
use crate::authorizer::{Ask, Authorizer, Query, Subject};
use crate::config::{Config, ReadAccess};
use crate::entitlement::Window;
use crate::identity::{Credentials, KeyHash, KeyMeta};
use crate::route::RouteKey;
use crate::usage::MAX_COST;

/// The internal API service.
#[derive(Debug, Clone)]
pub struct Api {
    authorizer: Arc<Authorizer>,
    accounts: Arc<Accounts>,
}

impl Api {
    /// A service deciding with `authorizer` and managing accounts with `accounts`.
    pub fn new(authorizer: Arc<Authorizer>, accounts: Arc<Accounts>) -> Self {
        Self { authorizer, accounts }
    }
}

/// The `tollgate.v1` methods that always need the admin token.
const ADMIN_ONLY: [&str; 8] = [
    "PutEntitlement",
    "BlockAccount",
    "UnblockAccount",
    "SetCredits",
    "AddCredits",
    "CreateApiKey",
    "RevokeApiKey",
    "ResetUsage",
];

/// `tollgate.v1` with the admin token checked before the message is read,
/// for the calls that always need it ([`ADMIN_ONLY`]): prost decodes
/// `PutEntitlement`'s repeated fields into ~40 times their size on the
/// wire (an empty quota override is 2 bytes there, ~90 in memory), and a
/// caller without the token should not get tollgate to build any of it.
/// The refusal is the handler's own (logged and counted the same); the
/// handlers still check, whatever serves them.
#[derive(Debug, Clone)]
pub struct AdminFirst<S> {
    inner: S,
    api: Api,
}

impl<S> AdminFirst<S> {
    /// `inner` (the generated server of `api`), guarded by `api`'s tokens.
    pub fn new(inner: S, api: Api) -> Self {
        Self { inner, api }
    }
}

impl<S: NamedService> NamedService for AdminFirst<S> {
    const NAME: &'static str = S::NAME;
}

/// The metadata and extensions (the peer, for the refusal's log line) of `req`, without its message.
fn probe<B>(req: &http::Request<B>) -> Request<()> {
    let metadata = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    Request::from_parts(metadata, req.extensions().clone(), ())
}

impl<S, B> tower::Service<http::Request<B>> for AdminFirst<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().strip_prefix("/tollgate.v1.Tollgate/");
        if let Some(rpc) = method.and_then(|m| ADMIN_ONLY.into_iter().find(|a| *a == m))
            && let Err(status) = self.api.require_admin(rpc, &probe(&req))
        {
            return Either::Right(std::future::ready(Ok(status.into_http())));
        }
        Either::Left(self.inner.call(req))
    }
}

/// `Authorize` names its subject directly; no request headers are read.
struct NoCredentials;

impl Credentials for NoCredentials {
    fn header(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
    fn claim(&self, _: &str, _: &str, _: &str) -> Option<String> {
        None
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// A wire timestamp as an instant. One chrono cannot hold is clamped to the
/// end it overshoots, so the service refuses it as out of range, like any other.
fn instant(t: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32).unwrap_or(if t.seconds < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// A wire duration. A negative one is below every minimum, so it reads as zero.
fn duration(d: prost_types::Duration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

fn quota_state(q: &crate::decision::QuotaState) -> QuotaState {
    QuotaState {
        meter: q.quota.meter.to_string(),
        policy: q.quota.policy_name(),
        limit: q.quota.limit,
        used: q.used,
        remaining: q.remaining,
        resets_at: Some(timestamp(q.resets_at)),
        rate: q.quota.window.is_rate(),
        soft: q.quota.is_soft(),
        overage: q.overage,
        ceiling: q.quota.ceiling_set(),
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

/// `PutEntitlement`'s entitlement as the service takes it; the service names
/// fields as the message does, under `entitlement`.
fn edit_of(e: Entitlement) -> EntitlementEdit {
    EntitlementEdit {
        account_id: e.account_id,
        plan: e.plan,
        status: e.status,
        past_due_since: e.past_due_since.as_ref().map(instant),
        expires_at: e.expires_at.as_ref().map(instant),
        blocked: e.blocked,
        extra_features: e.extra_features,
        quota_overrides: e
            .quota_overrides
            .into_iter()
            .map(|q| QuotaEdit {
                meter: q.meter,
                limit: q.limit,
                period: q.period,
                per: q.per.map(duration),
                soft: q.soft,
                ceiling: q.ceiling,
            })
            .collect(),
        stripe_customer: e.stripe_customer,
    }
}

fn entitlement_of(state: &AccountState) -> Entitlement {
    let a = &state.account;
    Entitlement {
        account_id: a.id.to_string(),
        plan: a.plan.to_string(),
        status: a.status.as_str().to_owned(),
        past_due_since: a.past_due_since.map(timestamp),
        expires_at: a.expires_at.map(timestamp),
        blocked: a.blocked,
        extra_features: a.extra_features.iter().cloned().collect(),
        quota_overrides: a
            .quota_overrides
            .iter()
            .map(|q| QuotaOverride {
                meter: q.meter.to_string(),
                limit: q.limit,
                period: match q.window {
                    Window::Calendar(p) => p.as_str().to_owned(),
                    Window::Rolling(_) => String::new(),
                },
                per: match q.window {
                    Window::Rolling(d) => prost_types::Duration::try_from(d).ok(),
                    Window::Calendar(_) => None,
                },
                soft: q.is_soft(),
                ceiling: q.ceiling_set(),
            })
            .collect(),
        stripe_customer: a.stripe_customer.clone().unwrap_or_default(),
        credits: state.credits,
    }
}

fn usage_of(u: Usage) -> UsageResponse {
    UsageResponse {
        account_id: u.account,
        plan: u.plan,
        quotas: u.quotas.iter().map(quota_state).collect(),
        credits: u.credits,
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

/// `Authorize`'s subject, bounded before any lookup.
fn subject(subject: &Option<PbSubject>) -> Result<Subject<'_, NoCredentials>, Invalid> {
    match subject {
        Some(PbSubject::AccountId(id)) if !id.is_empty() => {
            check_account_id(id, "account_id")?;
            Ok(Subject::AccountId(id))
        }
        Some(PbSubject::ApiKey(key)) if !key.is_empty() => {
            if !crate::identity::is_valid_key(key) {
                let reason = format!("must be 1-{} visible ASCII characters", crate::identity::MAX_KEY_BYTES);
                return Err(Invalid::new("api_key", reason));
            }
            Ok(Subject::ApiKey(key))
        }
        _ => Err(Invalid::new("subject", "set account_id or api_key")),
    }
}

/// `Authorize`'s target, bounded before any lookup.
fn ask(target: &Option<PbTarget>) -> Result<Ask<'_>, Invalid> {
    match target {
        Some(PbTarget::Route(r)) => {
            if !r.path.starts_with('/') {
                return Err(Invalid::new("route.path", "must start with /"));
            }
            check_optional_name(&r.method, "route.method")?;
            if r.host.len() > 255 {
                return Err(Invalid::new("route.host", "at most 255 bytes"));
            }
            Ok(Ask::Http(RouteKey { path: &r.path, method: &r.method, host: &r.host }))
        }
        Some(PbTarget::Feature(f)) => {
            check_optional_name(&f.feature, "feature.feature")?;
            check_optional_name(&f.meter, "feature.meter")?;
            Ok(Ask::Feature {
                feature: Some(f.feature.as_str()).filter(|s| !s.is_empty()),
                meter: Some(f.meter.as_str()).filter(|s| !s.is_empty()),
            })
        }
        None => Err(Invalid::new("target", "set feature or route")),
    }
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

    async fn set_blocked(&self, req: Request<AccountRequest>, blocked: bool) -> Result<Response<Entitlement>, Status> {
        self.require_admin(if blocked { "BlockAccount" } else { "UnblockAccount" }, &req)?;
        let state = self.accounts.set_blocked(&req.get_ref().account_id, blocked).await?;
        Ok(Response::new(entitlement_of(&state)))
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
        let subject = subject(&req.subject)?;
        if req.cost > MAX_COST {
            return Err(Invalid::new("cost", format!("must be at most {MAX_COST}")).into());
        }
        let ask = ask(&req.target)?;
        let query = Query {
            subject,
            ask,
            cost: Some(req.cost).filter(|c| *c > 0),
            dry_run: req.dry_run,
            peer_verified: false,
            client_headers_unfiltered: false,
            own_headers_shown: false,
        };
        let outcome = self.authorizer.authorize(query).await?;
        let d = &outcome.decision;
        outcome.trace();
        Ok(Response::new(AuthorizeResponse {
            allowed: d.is_allowed(),
            http_status: u32::from(d.verdict.http_status()),
            code: d.verdict.label().to_owned(),
            account_id: d.account.as_deref().unwrap_or_default().to_owned(),
            plan: d.plan.as_deref().unwrap_or_default().to_owned(),
            problem_json: outcome.response.body.clone().unwrap_or_default(),
            quotas: d.quotas.iter().map(quota_state).collect(),
            credits_remaining: d.credits,
            headers: outcome.response.client_headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            shadow_code: d.shadowed.map(|c| c.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    async fn get_entitlement(&self, req: Request<AccountRequest>) -> Result<Response<Entitlement>, Status> {
        self.require_read("GetEntitlement", &req)?;
        let state = self.accounts.get(&req.get_ref().account_id).await?;
        Ok(Response::new(entitlement_of(&state)))
    }

    async fn put_entitlement(&self, req: Request<PutEntitlementRequest>) -> Result<Response<Entitlement>, Status> {
        self.require_admin("PutEntitlement", &req)?;
        let e = req.into_inner().entitlement.ok_or_else(|| Invalid::new("entitlement", "required"))?;
        let state = self.accounts.put(edit_of(e)).await.map_err(|e| e.under("entitlement"))?;
        Ok(Response::new(entitlement_of(&state)))
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
        let credits = self.accounts.set_credits(&r.account_id, r.credits).await?;
        Ok(Response::new(CreditsResponse { account_id: r.account_id, credits }))
    }

    async fn add_credits(&self, req: Request<AddCreditsRequest>) -> Result<Response<CreditsResponse>, Status> {
        self.require_admin("AddCredits", &req)?;
        let r = req.into_inner();
        let credits = self.accounts.add_credits(&r.account_id, r.delta).await?;
        Ok(Response::new(CreditsResponse { account_id: r.account_id, credits }))
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        self.require_admin("CreateApiKey", &req)?;
        let r = req.into_inner();
        let new = self.accounts.create_key(&r.account_id, &r.name).await?;
        Ok(Response::new(CreateApiKeyResponse { key: Some(key_info(&new.hash, &new.meta)), api_key: new.key }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        self.require_admin("RevokeApiKey", &req)?;
        let r = req.get_ref();
        let revoked = self.accounts.revoke_key(&r.account_id, &r.key_id).await?;
        Ok(Response::new(RevokeApiKeyResponse { revoked }))
    }

    async fn list_api_keys(&self, req: Request<AccountRequest>) -> Result<Response<ListApiKeysResponse>, Status> {
        self.require_read("ListApiKeys", &req)?;
        let keys = self.accounts.list_keys(&req.get_ref().account_id).await?;
        Ok(Response::new(ListApiKeysResponse { keys: keys.iter().map(|(h, m)| key_info(h, m)).collect() }))
    }

    async fn get_usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        self.require_read("GetUsage", &req)?;
        let r = req.get_ref();
        Ok(Response::new(usage_of(self.accounts.usage(&r.account_id, &r.meter).await?)))
    }

    async fn reset_usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        self.require_admin("ResetUsage", &req)?;
        let r = req.get_ref();
        Ok(Response::new(usage_of(self.accounts.reset_usage(&r.account_id, &r.meter).await?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method [`AdminFirst`] guards is one of the service's (a
    /// misspelt name would leave its call read before its token is checked).
    #[test]
    fn admin_only_methods_are_the_service_s() {
        for m in ADMIN_ONLY {
            assert!(super::super::API_METHODS.contains(&format!("tollgate.v1.Tollgate/{m}").as_str()), "{m}");
        }
    }
}

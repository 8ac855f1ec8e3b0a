//! `tollgate.v1.Tollgate`: decisions for internal services, without Envoy.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::authorize_request::{Subject as PbSubject, Target as PbTarget};
use super::pb::tollgate_server::Tollgate;
use super::pb::{AuthorizeRequest, AuthorizeResponse, QuotaState};
use crate::authorizer::{Ask, Authorizer, Query, Subject};
use crate::identity::Credentials;
use crate::route::RouteKey;

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

#[tonic::async_trait]
impl Tollgate for Api {
    async fn authorize(&self, request: Request<AuthorizeRequest>) -> Result<Response<AuthorizeResponse>, Status> {
        let req = request.into_inner();
        let subject = match &req.subject {
            Some(PbSubject::AccountId(id)) if !id.is_empty() => Subject::AccountId(id),
            Some(PbSubject::ApiKey(key)) if !key.is_empty() => Subject::ApiKey(key),
            _ => return Err(Status::invalid_argument("subject: set account_id or api_key")),
        };
        let ask = match &req.target {
            Some(PbTarget::Route(r)) => {
                if !r.path.starts_with('/') {
                    return Err(Status::invalid_argument("route.path: must start with /"));
                }
                Ask::Http(RouteKey { path: &r.path, method: &r.method, host: &r.host })
            }
            Some(PbTarget::Feature(f)) => Ask::Feature {
                feature: Some(f.feature.as_str()).filter(|s| !s.is_empty()),
                meter: Some(f.meter.as_str()).filter(|s| !s.is_empty()),
            },
            None => return Err(Status::invalid_argument("target: set feature or route")),
        };
        let query =
            Query::<NoCredentials> { subject, ask, cost: Some(req.cost).filter(|c| *c > 0), dry_run: req.dry_run };
        let outcome = self.authorizer.authorize(query).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let d = &outcome.decision;
        Ok(Response::new(AuthorizeResponse {
            allowed: d.is_allowed(),
            http_status: u32::from(d.verdict.http_status()),
            code: d.verdict.label().to_owned(),
            account_id: d.account.clone().unwrap_or_default(),
            plan: d.plan.clone().unwrap_or_default(),
            problem_json: outcome.response.body.clone().unwrap_or_default(),
            quotas: d
                .quotas
                .iter()
                .map(|q| QuotaState {
                    meter: q.quota.meter.clone(),
                    policy: q.quota.policy_name(),
                    limit: q.quota.limit,
                    used: q.used,
                    remaining: q.remaining,
                    resets_at: Some(timestamp(q.resets_at)),
                    rate: q.quota.window.is_rate(),
                })
                .collect(),
            credits_remaining: d.credits,
            headers: outcome.response.client_headers.iter().cloned().collect(),
        }))
    }
}

//! gRPC transports: Envoy's ext_authz and tollgate's own `tollgate.v1` API.
//!
//! Thin translations between protobuf messages and the
//! [`Authorizer`] and [`Accounts`] service; failures become statuses in one
//! place ([`status`]). Prost, Envoy and generated tonic types stop here:
//! [`services`] hands the server ready routes and a [`Health`] handle.
//!
//! May use: `authorizer`, `accounts`, and what their signatures name.

pub mod access_log;
pub mod api;
pub mod bounded;
pub mod ext_authz;
pub mod status;

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::accounts::Accounts;
use crate::authorizer::Authorizer;
use crate::settler::Settler;
use access_log::AccessLog;
use api::Api;
use bounded::Bounded;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use ext_authz::ExtAuthz;
use pb::tollgate_server::TollgateServer;

/// Code generated from `proto/tollgate/v1/tollgate.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tollgate.v1");
}

/// The services of the gRPC port, ready to serve.
#[derive(Debug)]
pub struct Services {
    /// `envoy.service.auth.v3.Authorization`,
    /// `envoy.service.accesslog.v3.AccessLogService`, `tollgate.v1.Tollgate`
    /// and `grpc.health.v1.Health`.
    pub routes: Routes,
    /// What `grpc.health.v1.Health` reports.
    pub health: Health,
}

/// What bounds the services of the gRPC port.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Messages (either way) over this many bytes are refused.
    pub max_message: usize,
    /// Calls that run longer end with CANCELLED (all but the access-log stream).
    pub request_timeout: std::time::Duration,
    /// Calls in flight at once (Checks, the API and health share them; the
    /// access-log streams have as many of their own); more are refused.
    pub max_inflight: usize,
    /// Turns true when shutdown begins: access-log streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Builds every service of the gRPC port within `bounds`; health reports
/// nothing until told.
pub fn services(authorizer: Arc<Authorizer>, accounts: Arc<Accounts>, bounds: Bounds) -> Services {
    let Bounds { max_message, request_timeout, max_inflight, stopping } = bounds;
    let calls = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let streams = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let timed = Some(request_timeout);
    let (reporter, health) = tonic_health::server::health_reporter();
    let routes = Routes::new(Bounded::new(
        health.max_decoding_message_size(max_message).max_encoding_message_size(max_message),
        timed,
        calls.clone(),
    ))
    .add_service(Bounded::new(
        AuthorizationServer::new(ExtAuthz::new(authorizer.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        timed,
        calls.clone(),
    ))
    .add_service(Bounded::new(
        AccessLogServiceServer::new(AccessLog::new(Arc::new(Settler::new(authorizer.clone())), stopping))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        None,
        streams,
    ))
    .add_service(Bounded::new(
        TollgateServer::new(Api::new(authorizer, accounts))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        timed,
        calls,
    ));
    Services { routes, health: Health { reporter } }
}

/// Sets what `grpc.health.v1.Health` reports. Statuses are keyed by the
/// generated server types, so their names cannot drift from the services'.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Liveness, the server-wide `""` status: SERVING while the process runs.
    pub async fn set_live(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
    }

    /// Readiness of the services that need the store (ext_authz, `tollgate.v1`).
    pub async fn set_ready(&self, serving: bool) {
        if serving {
            self.reporter.set_serving::<AuthorizationServer<ExtAuthz>>().await;
            self.reporter.set_serving::<TollgateServer<Api>>().await;
        } else {
            self.reporter.set_not_serving::<AuthorizationServer<ExtAuthz>>().await;
            self.reporter.set_not_serving::<TollgateServer<Api>>().await;
        }
    }
}

//! gRPC transports: Envoy's ext_authz and tollgate's own `tollgate.v1` API.
//!
//! Thin translations between protobuf messages and the
//! [`Authorizer`] and [`Accounts`] service; failures become statuses in one
//! place ([`status`]). Prost, Envoy and generated tonic types stop here:
//! [`services`] hands the server ready routes and a [`Health`] handle.
//!
//! May use: `authorizer`, `accounts`, and what their signatures name.

pub mod access_log;
pub mod answer;
pub mod api;
pub mod bounded;
pub mod check_request;
pub mod ext_authz;
pub mod frames;
pub mod log_message;
pub mod status;
pub mod view_server;

use std::sync::Arc;

use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::accounts::Accounts;
use crate::authorizer::Authorizer;
use crate::settler::Settler;
use access_log::{AccessLog, AccessLogServer};
use answer::{Check, CheckServer};
use api::{AdminFirst, Api};
use bounded::{Bounded, Slots};
use ext_authz::ExtAuthz;
use frames::SmallFramesService;
use pb::tollgate_server::TollgateServer;

/// The descriptors `grpc.reflection` serves: `tollgate.v1`, Envoy's ext_authz
/// and access-log services and what they import (built by `build.rs`);
/// health's come with `tonic-health`.
pub const REFLECTION_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reflection_descriptors.bin"));

/// The `tollgate.v1` methods, as spans are named (`tests/service.rs` checks
/// the list against the service's descriptor).
pub const API_METHODS: [&str; 12] = [
    "tollgate.v1.Tollgate/Authorize",
    "tollgate.v1.Tollgate/GetEntitlement",
    "tollgate.v1.Tollgate/PutEntitlement",
    "tollgate.v1.Tollgate/BlockAccount",
    "tollgate.v1.Tollgate/UnblockAccount",
    "tollgate.v1.Tollgate/SetCredits",
    "tollgate.v1.Tollgate/AddCredits",
    "tollgate.v1.Tollgate/CreateApiKey",
    "tollgate.v1.Tollgate/RevokeApiKey",
    "tollgate.v1.Tollgate/ListApiKeys",
    "tollgate.v1.Tollgate/GetUsage",
    "tollgate.v1.Tollgate/ResetUsage",
];

/// Code generated from `proto/tollgate/v1/tollgate.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tollgate.v1");
}

/// The services of the gRPC port, ready to serve.
#[derive(Debug)]
pub struct Services {
    /// `envoy.service.auth.v3.Authorization`,
    /// `envoy.service.accesslog.v3.AccessLogService`, `tollgate.v1.Tollgate`,
    /// `grpc.health.v1.Health`, and unless switched off `grpc.reflection` (v1 and v1alpha).
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
    /// The port speaks TLS. Its streams are vectored to h2 (tonic's TLS
    /// stream says so whatever ours says, see `listener`), so Check answers
    /// are cut into DATA frames under 256 bytes, not 1 KiB ([`frames`]).
    pub tls: bool,
}

/// Builds every service of the gRPC port within `bounds`, with server
/// reflection when `reflection` (so `grpcurl host:9191 list` needs no
/// `.proto` files); health reports nothing until told.
pub fn services(authorizer: Arc<Authorizer>, accounts: Arc<Accounts>, bounds: Bounds, reflection: bool) -> Services {
    let Bounds { max_message, request_timeout, max_inflight, stopping, tls } = bounds;
    let calls = Slots::new(max_inflight);
    let streams = Slots::new(max_inflight);
    let timed = Some(request_timeout);
    let (reporter, health) = tonic_health::server::health_reporter();
    let routes = Routes::new(Bounded::new(
        health.max_decoding_message_size(max_message).max_encoding_message_size(max_message),
        timed,
        calls.clone(),
    ));
    let api = Api::new(authorizer.clone(), accounts);
    let check = CheckServer::new(Check::new(ExtAuthz::new(authorizer.clone())), max_message);
    let frame = if tls { frames::MAX_FRAME } else { frames::MAX_FRAME_UNVECTORED };
    let routes = routes
        .add_service(
            Bounded::new(SmallFramesService::with_max(check, frame), timed, calls.clone())
                .traced(&["envoy.service.auth.v3.Authorization/Check"]),
        )
        .add_service(Bounded::new(
            AccessLogServer::new(AccessLog::new(Arc::new(Settler::new(authorizer.clone())), stopping), max_message),
            None,
            streams,
        ))
        .add_service(
            Bounded::new(
                AdminFirst::new(
                    TollgateServer::new(api.clone())
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                    api,
                ),
                timed,
                calls.clone(),
            )
            .traced(&API_METHODS),
        );
    let routes = if reflection { with_reflection(routes, max_message, timed, calls) } else { routes };
    Services { routes, health: Health { reporter } }
}

/// `grpc.reflection.v1` and `v1alpha` (grpcurl asks either). A call takes a
/// slot of the calls' pool only until its stream starts (tonic-reflection
/// answers from a task of its own); the stream is then bounded by the
/// connection's limits (`max_concurrent_streams`, `max_connection_age`).
/// The descriptors (no comments: `build.rs` strips them) are built in and checked by a test;
/// were they unreadable, the port serves without reflection rather than not at all.
fn with_reflection(
    routes: Routes,
    max_message: usize,
    timed: Option<std::time::Duration>,
    calls: Arc<Slots>,
) -> Routes {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(REFLECTION_DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    match (builder().build_v1(), builder().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => routes
            .add_service(Bounded::new(
                v1.max_decoding_message_size(max_message).max_encoding_message_size(max_message),
                timed,
                calls.clone(),
            ))
            .add_service(Bounded::new(
                v1alpha.max_decoding_message_size(max_message).max_encoding_message_size(max_message),
                timed,
                calls,
            )),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "gRPC reflection descriptors unreadable; serving without reflection");
            routes
        }
    }
}

/// Sets what `grpc.health.v1.Health` reports. Statuses are keyed by the
/// services' types (the Check server takes the generated server's name), so
/// their names cannot drift from the services'.
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
            self.reporter.set_serving::<CheckServer>().await;
            self.reporter.set_serving::<TollgateServer<Api>>().await;
        } else {
            self.reporter.set_not_serving::<CheckServer>().await;
            self.reporter.set_not_serving::<TollgateServer<Api>>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn the_traced_api_methods_are_the_service_s() {
        let set = prost_types::FileDescriptorSet::decode(super::REFLECTION_DESCRIPTORS).expect("descriptors decode");
        let mut methods: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "tollgate.v1")
            .flat_map(|f| f.service.iter())
            .flat_map(|s| s.method.iter().map(move |m| format!("tollgate.v1.{}/{}", s.name(), m.name())))
            .collect();
        let mut listed: Vec<String> = super::API_METHODS.iter().map(|m| m.to_string()).collect();
        methods.sort();
        listed.sort();
        assert_eq!(methods, listed);
        assert!(set.file.iter().all(|f| f.source_code_info.is_none()), "comments are stripped");
    }
}

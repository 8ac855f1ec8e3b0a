//! gRPC transports: Envoy's ext_authz and tollgate's own `tollgate.v1` API.
//!
//! Thin translations between protobuf messages and the [`Authorizer`](crate::authorizer::Authorizer);
//! prost and Envoy types stop here.

pub mod api;
pub mod ext_authz;

/// Code generated from `proto/tollgate/v1/tollgate.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tollgate.v1");
}

//! Bytes sent as a gRPC message as they are: what a hand-made client on
//! the gRPC port may send and no prost type can carry (strings that are
//! not UTF-8, fields in any order or number).

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A message's bytes, sent as they are (received, skipped).
#[derive(Debug, Default, Clone)]
pub struct Raw(pub Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A unary call of `path` (`/package.Service/Method`) with `message`'s bytes.
pub async fn unary(channel: Channel, path: &'static str, message: Request<Raw>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Raw, Raw>::default();
    grpc.unary(message, PathAndQuery::from_static(path), codec).await.map(|_| ())
}

/// A client stream of `path` with `messages`' bytes, to its end.
pub async fn client_streaming(channel: Channel, path: &'static str, messages: Vec<Raw>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Raw, Raw>::default();
    let messages = tokio_stream::iter(messages);
    grpc.client_streaming(Request::new(messages), PathAndQuery::from_static(path), codec).await.map(|_| ())
}

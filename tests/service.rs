//! The server around the decision: gRPC health, HTTP health and metrics,
//! graceful shutdown, and the `tollgate.v1` Authorize API.

use std::time::Duration;

use tollgate::grpc::pb::authorize_request::{Subject, Target};
use tollgate::grpc::pb::tollgate_client::TollgateClient;
use tollgate::grpc::pb::{AuthorizeRequest, FeatureTarget, RouteTarget};
use tollgate_testkit::{TestServer, http_check, http_get, spec_config};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(s: &TestServer, service: &str) -> ServingStatus {
    let mut c = HealthClient::new(s.channel().await);
    let r = c.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

#[tokio::test]
async fn grpc_health_serves_the_server_and_each_service() {
    let s = TestServer::start(&spec_config()).await;
    for service in ["", "envoy.service.auth.v3.Authorization", "tollgate.v1.Tollgate"] {
        assert_eq!(health(&s, service).await, ServingStatus::Serving, "{service:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn http_health_endpoints_answer() {
    let s = TestServer::start(&spec_config()).await;
    assert_eq!(http_get(s.http, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(s.http, "/readyz").await.unwrap().0, 200);
    assert_eq!(http_get(s.http, "/nope").await.unwrap().0, 404);
    s.stop().await;
}

#[tokio::test]
async fn metrics_count_decisions_by_status_and_code() {
    let s = TestServer::start(&spec_config()).await;
    s.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await;
    s.check(http_check("GET", "/v1/search", &[])).await;
    s.check(http_check("GET", "/v1/search", &[])).await;
    let (status, head, body) = http_get(s.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    assert!(body.contains("tollgate_decisions_total{status=\"200\",code=\"allowed\"} 1"), "{body}");
    assert!(body.contains("tollgate_decisions_total{status=\"401\",code=\"credentials_missing\"} 2"), "{body}");
    assert!(body.contains("tollgate_check_duration_seconds_count 3"), "{body}");
    for name in ["tollgate_cache_requests_total", "tollgate_store_errors_total", "tollgate_config_reloads_total"] {
        assert!(body.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))), "{name} in {body}");
    }
    s.stop().await;
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_before_the_listeners_close() {
    let yaml = spec_config() + "server: { drain_delay: 1s }\n";
    let mut s = TestServer::start(&yaml).await;
    let mut watch = HealthClient::new(s.channel().await)
        .watch(HealthCheckRequest { service: "envoy.service.auth.v3.Authorization".into() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    s.begin_stop();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Still answering Checks during the drain delay.
    let a = tollgate_testkit::Answer::of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await);
    assert!(a.allowed);
    assert_eq!(http_get(s.http, "/readyz").await.unwrap().0, 503);
    // An open Watch stream would hold the drain until drain_timeout.
    drop(watch);
    s.stop().await;
}

const SERVICE_TOKEN: &str = "service-0123456789abcdef0123456789abcdef";

/// The spec config with a service token, which `Authorize` by account or with spending needs.
fn service_config() -> String {
    spec_config() + &format!("server: {{ service_tokens: [{SERVICE_TOKEN}] }}\n")
}

/// A `tollgate.v1` client that sends the service token on every call.
async fn service_client(
    s: &TestServer,
) -> TollgateClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + use<>,
    >,
> {
    TollgateClient::with_interceptor(s.channel().await, |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", format!("Bearer {SERVICE_TOKEN}").parse().unwrap());
        Ok(r)
    })
}

fn authorize(subject: Subject, target: Target, dry_run: bool) -> AuthorizeRequest {
    AuthorizeRequest { subject: Some(subject), target: Some(target), cost: 0, dry_run }
}

fn search_route() -> Target {
    Target::Route(RouteTarget { path: "/v1/search?q=1".into(), method: "GET".into(), host: String::new() })
}

#[tokio::test]
async fn authorize_answers_like_a_check_and_dry_run_spends_nothing() {
    let s = TestServer::start(&service_config()).await;
    let mut c = service_client(&s).await;
    for _ in 0..3 {
        let r = c
            .authorize(authorize(Subject::AccountId("acct_free".into()), search_route(), true))
            .await
            .unwrap()
            .into_inner();
        assert!(r.allowed);
        assert_eq!(r.quotas[0].used, 0, "dry runs spend nothing");
    }
    for used in 1..=5 {
        let r = c
            .authorize(authorize(Subject::ApiKey("free-key".into()), search_route(), false))
            .await
            .unwrap()
            .into_inner();
        assert!(r.allowed);
        assert_eq!((r.account_id.as_str(), r.plan.as_str(), r.code.as_str()), ("acct_free", "free", "allowed"));
        assert_eq!(r.quotas[0].policy, "requests-month");
        assert_eq!(r.quotas[0].used, used);
        assert!(r.headers.contains_key("ratelimit"));
    }
    let r = c
        .authorize(authorize(Subject::AccountId("acct_free".into()), search_route(), true))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!((r.http_status, r.code.as_str()), (402, "quota_exhausted"));
    let problem: serde_json::Value = serde_json::from_str(&r.problem_json).unwrap();
    assert_eq!(problem["quota"]["used"], 5);

    let feature = Target::Feature(FeatureTarget { feature: "ai".into(), meter: String::new() });
    let r = c
        .authorize(authorize(Subject::AccountId("acct_wallet".into()), feature.clone(), false))
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    assert_eq!(r.credits_remaining, Some(14), "a feature target costs 1 by default");
    let mut req = authorize(Subject::AccountId("acct_wallet".into()), feature, false);
    req.cost = 20;
    let r = c.authorize(req).await.unwrap().into_inner();
    assert_eq!((r.http_status, r.code.as_str(), r.credits_remaining), (402, "insufficient_credits", Some(14)));
    s.stop().await;
}

#[tokio::test]
async fn authorize_rejects_requests_without_subject_or_target() {
    let s = TestServer::start(&service_config()).await;
    let mut c = service_client(&s).await;
    let err = c.authorize(AuthorizeRequest { target: Some(search_route()), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("subject"));
    let err = c
        .authorize(AuthorizeRequest { subject: Some(Subject::AccountId("acct_free".into())), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("target"));
    let r = c.authorize(authorize(Subject::ApiKey("nope".into()), search_route(), false)).await.unwrap().into_inner();
    assert_eq!((r.http_status, r.code.as_str()), (401, "credentials_invalid"));
    s.stop().await;
}

/// What `grpcurl localhost:9191 list` and `describe` ask, through server
/// reflection (v1 and v1alpha): every service of the port, with descriptors
/// that resolve; `server.reflection: false` hides them.
#[tokio::test]
async fn reflection_lists_and_describes_every_service_unless_switched_off() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = TestServer::start(&spec_config()).await;
    let ask = async |request: MessageRequest| {
        let mut c = ServerReflectionClient::new(s.channel().await);
        let req = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
        let mut answers = c.server_reflection_info(tokio_stream::iter([req])).await?.into_inner();
        Ok::<_, tonic::Status>(answers.message().await?.and_then(|r| r.message_response))
    };
    let Some(MessageResponse::ListServicesResponse(list)) =
        ask(MessageRequest::ListServices(String::new())).await.unwrap()
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "tollgate.v1.Tollgate",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.accesslog.v3.AccessLogService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    for symbol in ["envoy.service.auth.v3.Authorization", "tollgate.v1.Tollgate", "envoy.service.auth.v3.CheckRequest"]
    {
        let got = ask(MessageRequest::FileContainingSymbol(symbol.into())).await.unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = got else { panic!("{symbol}: {got:?}") };
        assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
    }
    // grpcurl's older default: v1alpha.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as Alpha;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
        let mut c = Alpha::new(s.channel().await);
        let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(AlphaRequest::ListServices(String::new())),
        };
        let mut answers = c.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
        assert!(answers.message().await.unwrap().is_some());
    }
    s.stop().await;

    let s = TestServer::start(&format!("{}server: {{ reflection: false }}\n", spec_config())).await;
    let mut c = ServerReflectionClient::new(s.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let err = match c.server_reflection_info(tokio_stream::iter([req])).await {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    s.stop().await;
}

/// What h2 writes for one Check over a connection whose stream is, or says
/// it is not, vectored: the write sizes, recorded.
mod one_write {
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
    use tollgate::accounts::Accounts;
    use tollgate::grpc::{Bounds, services};
    use tonic::codegen::http::Uri;
    use tonic::transport::server::Connected;

    /// The server's end of an in-memory connection, recording each write's size.
    struct Recording {
        io: DuplexStream,
        vectored: bool,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl Recording {
        fn record(&self, n: &Poll<io::Result<usize>>) {
            if let Poll::Ready(Ok(n)) = n {
                self.writes.lock().unwrap().push(*n);
            }
        }
    }

    impl AsyncRead for Recording {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = Pin::new(&mut this.io).poll_write(cx, buf);
            this.record(&n);
            n
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
            this.record(&n);
            n
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    impl Connected for Recording {
        type ConnectInfo = ();

        fn connect_info(&self) {}
    }

    /// A connector handing out the client's end of the one connection.
    #[derive(Clone)]
    struct Pipe(Arc<Mutex<Option<DuplexStream>>>);

    impl tower::Service<Uri> for Pipe {
        type Response = TokioIo<DuplexStream>;
        type Error = io::Error;
        type Future = std::future::Ready<io::Result<TokioIo<DuplexStream>>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let io = self.0.lock().unwrap().take().map(TokioIo::new);
            std::future::ready(io.ok_or_else(|| io::Error::other("one connection only")))
        }
    }

    /// The bench config, its `route_not_allowed` problem made long (~1.5 KB).
    fn long_deny_config() -> String {
        let detail = "No route allows this request. ".repeat(50);
        let yaml = tollgate_testkit::bench::config("{ backend: memory }");
        format!("{yaml}  overrides:\n    route_not_allowed: {{ detail: \"{detail}\" }}\n")
    }

    /// The writes of tollgate's answer to one Check of `path` (after two to
    /// settle the connection), served with `tls`'s services over a stream
    /// that is `vectored` or not; and the status code of the answer.
    async fn answer_writes(tls: bool, vectored: bool, path: &str) -> (Vec<usize>, i32) {
        let authorizer = tollgate_testkit::bench::authorizer_on(&long_deny_config()).await;
        let accounts = Arc::new(Accounts::new(authorizer.clone()));
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let bounds =
            Bounds { max_message: 1 << 20, request_timeout: Duration::from_secs(5), max_inflight: 16, stopping, tls };
        let routes = services(authorizer, accounts, bounds, false).routes;
        let (client_end, server_end) = tokio::io::duplex(1 << 16);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let server = Recording { io: server_end, vectored, writes: writes.clone() };
        let serving = tokio::spawn(
            tonic::transport::Server::builder().add_routes(routes).serve_with_incoming(tokio_stream::once(Ok::<
                _,
                io::Error,
            >(
                server
            ))),
        );
        let channel = tonic::transport::Endpoint::from_static("http://in-memory")
            .connect_with_connector(Pipe(Arc::new(Mutex::new(Some(client_end)))))
            .await
            .unwrap();
        let mut client = AuthorizationClient::new(channel);
        let mut request = tollgate_testkit::bench::check_request();
        let http = request.attributes.as_mut().and_then(|a| a.request.as_mut()).and_then(|r| r.http.as_mut());
        if let Some(http) = http {
            http.path = path.to_owned();
            http.headers.insert(":path".to_owned(), path.to_owned());
        }
        for _ in 0..2 {
            client.check(request.clone()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        writes.lock().unwrap().clear();
        let answer = client.check(request).await.unwrap().into_inner();
        let seen = writes.lock().unwrap().clone();
        serving.abort();
        (seen, answer.status.map_or(-1, |s| s.code))
    }

    const ALLOWED: &str = "/v1/search?q=x";
    const UNROUTED: &str = "/v2/nothing-here";

    #[tokio::test]
    async fn a_check_answer_leaves_in_one_write() {
        // tollgate's plain-TCP connections say they are not vectored (`listener`).
        let (plain, code) = answer_writes(false, false, ALLOWED).await;
        assert_eq!(code, 0, "the bench Check is allowed");
        assert_eq!(plain.len(), 1, "headers, message and trailers in one write: {plain:?}");
        assert!(plain[0] > 256, "the answer is past h2's vectored threshold, or this proves nothing: {plain:?}");
        // A deny past 1 KiB (h2's threshold there) is cut under it: one write still.
        let (long, code) = answer_writes(false, false, UNROUTED).await;
        assert_eq!(code, 7, "route_not_allowed: PERMISSION_DENIED");
        assert_eq!(long.len(), 1, "a long deny in one write: {long:?}");
        assert!(long[0] > 1500, "the deny is past 1 KiB, or this proves nothing: {long:?}");
        // Over TLS the stream is vectored; the answer goes out in frames under 256 bytes (`grpc::frames`).
        for path in [ALLOWED, UNROUTED] {
            let (tls, _) = answer_writes(true, true, path).await;
            assert_eq!(tls.len(), 1, "{path}: small frames, one write: {tls:?}");
        }
        // Uncut over a vectored stream: the message is kept aside and the
        // trailers follow in a write of their own (what the cutting prevents).
        let (uncut, _) = answer_writes(false, true, ALLOWED).await;
        assert!(uncut.len() >= 2, "frames up to 1 KiB over a vectored stream: {uncut:?}");
    }
}

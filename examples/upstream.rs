//! A stand-in for your API in the quick start: listens on 127.0.0.1:8080 and
//! answers every request with what it received, so you can see what Envoy
//! forwards after tollgate allowed it (`x-tollgate-account` in, `x-api-key` out).
//!
//! ```text
//! cargo run --example upstream            # or: -- 127.0.0.1:9000
//! ```

use axum::extract::Request;
use axum::http::header;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("upstream listening on {addr}");
    let app = axum::Router::new().fallback(|req: Request| async move {
        let mut text = format!("upstream reached: {} {}\n", req.method(), req.uri());
        for (name, value) in req.headers() {
            text += &format!("  {name}: {}\n", value.to_str().unwrap_or("<binary>"));
        }
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text)
    });
    axum::serve(listener, app).await?;
    Ok(())
}

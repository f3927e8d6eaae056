//! The admin HTTP endpoint (`[admin] listen`), served with hyper:
//! `GET /metrics` (Prometheus text format), `/healthz` (alive), `/ready`
//! (listeners bound and accepting), `/sessions` (JSON snapshot of every open
//! session). Everything else is 404 (405 for another method). It exposes
//! nothing that changes state.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::Phase;
use crate::proxy::Runtime;

/// Serves the admin endpoint on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    rt: Runtime,
    phase: watch::Receiver<Phase>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = accepted else {
            // EMFILE and friends: the proxy matters more; try again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let rt = rt.clone();
        let phase = phase.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let rt = rt.clone();
                let phase = *phase.borrow();
                async move { Ok::<_, Infallible>(handle(req, &rt, phase)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "admin connection failed");
                    }
                }
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// Answers one request.
pub fn handle(req: Request<Incoming>, rt: &Runtime, phase: Phase) -> Response<Full<Bytes>> {
    route(req.method(), req.uri().path(), rt, phase)
}

fn route(method: &Method, path: &str, rt: &Runtime, phase: Phase) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let known = matches!(path, "/metrics" | "/healthz" | "/ready" | "/sessions");
    if !known {
        return reply(StatusCode::NOT_FOUND, TEXT, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n");
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            rt.metrics.encode(),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/ready" => {
            if phase == Phase::Running {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("{}\n", phase.as_str()),
                )
            }
        }
        _ => {
            let views = rt.shared.session_views();
            let body = serde_json::to_vec_pretty(&views).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
    }
}

//! The HTTP/1.1 server under the health endpoints: bounded connections, a request head timeout,
//! and JSON answers with kube-proxy's headers.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinSet,
};
use tracing::debug;

/// Connections served at once on one port; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent a complete request head within this time is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A JSON response with kube-proxy's headers (`Content-Type: application/json`,
/// `X-Content-Type-Options: nosniff`).
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    // The bodies are strings, integers and booleans, which always serialize.
    let json = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// Locks shared health state (an answer, the agent's health): plain data, always whole, so a
/// panic elsewhere cannot leave it half-written and a poisoned lock is used as is.
pub fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A listening socket on `addr`, with `SO_REUSEADDR` so that a port closed and opened again
/// does not wait for its old connections' `TIME_WAIT`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Answers a request for a path.
pub type Respond = Arc<dyn Fn(&str) -> Response<Full<Bytes>> + Send + Sync>;

/// Accepts connections on `listener` and answers every request on them with `respond`.
pub async fn serve(listener: TcpListener, respond: Respond) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, peer)) => {
                    let respond = Arc::clone(&respond);
                    connections.spawn(async move {
                        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let resp = respond(request.uri().path());
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "health connection");
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "health check accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

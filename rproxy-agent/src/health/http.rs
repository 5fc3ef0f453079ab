//! The HTTP/1.1 server under the health endpoints: bounded connections, a request head timeout,
//! and JSON answers with kube-proxy's headers.
use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, info, warn};

/// Connections served at once on one port; more wait in the listen backlog. Each is a small
/// task, so hundreds of idle or slow clients cost little and leave room for the probes (the
/// agent raises its file descriptor limit to match, `raise_fd_limit`).
const MAX_CONNECTIONS: usize = 1024;
/// A client that has not sent a complete request head within this time is disconnected; this
/// also closes a kept-alive connection that stays idle as long (hyper times the wait for each
/// request head).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The read buffer, which bounds a request head (hyper's minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;

/// Raises this process's soft limit of open files to its hard limit (at most 65,536): the
/// health, metrics and health check node port servers may each hold `MAX_CONNECTIONS`.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return;
    }
    let want = lim.rlim_max.min(65_536);
    if lim.rlim_cur < want {
        let new = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const new) } == 0 {
            debug!(from = lim.rlim_cur, to = want, "open files limit raised");
        }
    }
}
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
/// does not wait for its old connections' `TIME_WAIT`. The unspecified IPv4 address
/// (`0.0.0.0`, kube-proxy's default) listens on both families, as Go's listener that kube-proxy
/// uses does: a dual-stack socket on `[::]`, or IPv4 only on a host without IPv6.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        match listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port()))) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            other => return other,
        }
    }
    listen(addr)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        // Whatever net.ipv6.bindv6only says: IPv4 clients too (as IPv4-mapped addresses).
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
    }
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
                            // Request heads beyond this are refused (431): the paths are short.
                            .max_buf_size(MAX_HEAD)
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

/// One port answered by [`serve`] (the agent's `/healthz`, `/metrics`): opened by the first
/// [`Server::ensure`], and on a failed bind (a port in use, an address not there yet) logged once
/// and tried again by the next `ensure`. Must be used from within a Tokio runtime.
pub struct Server {
    /// What it serves, for the logs (`"healthz (/healthz, /livez)"`).
    what: &'static str,
    addr: Option<SocketAddr>,
    respond: Respond,
    task: Option<JoinHandle<()>>,
    /// The last bind error logged.
    failed: Option<String>,
}

impl Server {
    /// `addr` `None`: disabled.
    #[must_use]
    pub fn new(what: &'static str, addr: Option<SocketAddr>, respond: Respond) -> Self {
        Self { what, addr, respond, task: None, failed: None }
    }

    /// Opens the port if it is not open yet (the first call, or a retry after a failed bind).
    pub fn ensure(&mut self) {
        let Some(addr) = self.addr else { return };
        if self.task.is_some() {
            return;
        }
        match bind(addr) {
            Ok(listener) => {
                info!(%addr, "{} open", self.what);
                self.failed = None;
                self.task = Some(tokio::spawn(serve(listener, Arc::clone(&self.respond))));
            }
            Err(e) => {
                let e = e.to_string();
                if self.failed.as_ref() != Some(&e) {
                    warn!(%addr, error = %e, "{}: bind failed; will retry", self.what);
                    self.failed = Some(e);
                }
            }
        }
    }

    /// Whether the port is open.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.task.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's default bind address, `0.0.0.0`, answers IPv6 clients as well.
    #[tokio::test]
    async fn the_unspecified_ipv4_address_listens_on_both_families() {
        let listener = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).unwrap();
        let port = listener.local_addr().unwrap().port();
        for client in [IpAddr::from(Ipv4Addr::LOCALHOST), IpAddr::from(Ipv6Addr::LOCALHOST)] {
            let connect = tokio::net::TcpStream::connect((client, port));
            let (accepted, connected) = tokio::join!(listener.accept(), connect);
            accepted.unwrap();
            connected.unwrap_or_else(|e| panic!("{client}: {e}"));
        }
    }
}

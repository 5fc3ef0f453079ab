//! Health check node ports: what kube-proxy's health check server answers for `LoadBalancer`
//! Services with `externalTrafficPolicy: Local`, so that a cloud load balancer sends traffic only
//! to nodes that have local endpoints.
//!
//! Each [`HealthCheck`] of the desired state is served on `<bind>:<node_port>` (`0.0.0.0` in the
//! agent), HTTP/1.1. Every request, whatever its method and path, gets the answer kube-proxy
//! gives ([`response`]): status 200 when the Service has local endpoints, else 503, with
//! `Content-Type: application/json`, `X-Content-Type-Options: nosniff` and the body
//! `{"service":{"namespace":"…","name":"…"},"localEndpoints":N,"serviceProxyHealthy":B}`.
//! `serviceProxyHealthy` is the agent's own health ([`super::proxy`]): when it is false
//! the answer is 503 whatever the count, as kube-proxy's.
//!
//! [`HealthCheckServer::update`] opens and closes listeners as health checks appear and go away,
//! and changes the answer of an open port in place (no reopening; open connections see it at
//! their next request). A failed bind is logged at warn (once per Service, port and error) and
//! retried by the next update. Two Services with the same port: the first in `namespace/name`
//! order is served, the other is logged ([`plan`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{
    http::{bind, json_response, lock, serve},
    proxy::ProxyHealth,
};
use crate::model::{HealthCheck, ObjectRef};

/// What one health check port answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub service: ObjectRef,
    /// [`HealthCheck::local_endpoints`].
    pub local_endpoints: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The response to any request on a health check port, as kube-proxy's health check server
/// builds it (`pkg/proxy/healthcheck/service_health.go`): 200 only with local endpoints and a
/// healthy agent (`proxy_healthy`).
#[must_use]
pub fn response(answer: &Answer, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let body = Body {
        service: ServiceName { namespace: &answer.service.namespace, name: &answer.service.name },
        local_endpoints: answer.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let ok = answer.local_endpoints > 0 && proxy_healthy;
    json_response(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// Which Service each port serves, from the desired health checks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<u16, Answer>,
    /// `(service, port, served instead)`: Services whose port another one already has.
    pub conflicts: Vec<(ObjectRef, u16, ObjectRef)>,
}

/// Assigns each port to the first Service (in `namespace/name` order) that asks for it.
#[must_use]
pub fn plan(checks: &BTreeMap<ObjectRef, HealthCheck>) -> Plan {
    let mut ordered: Vec<(String, &ObjectRef, &HealthCheck)> =
        checks.iter().map(|(svc, check)| (svc.to_string(), svc, check)).collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));
    let mut plan = Plan::default();
    for (_, svc, check) in ordered {
        if let Some(winner) = plan.ports.get(&check.node_port) {
            plan.conflicts.push((svc.clone(), check.node_port, winner.service.clone()));
        } else {
            plan.ports.insert(check.node_port, Answer { service: svc.clone(), local_endpoints: check.local_endpoints });
        }
    }
    plan
}

/// One open port: its answer (shared with the connections) and the task accepting on it.
struct Listener {
    answer: Arc<Mutex<Answer>>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Ends the accept loop, which drops the socket and every connection it serves.
        self.task.abort();
    }
}

/// Serves the health check node ports. See the module documentation. Must be used from within
/// a Tokio runtime (it spawns a task per open port).
pub struct HealthCheckServer {
    bind: Ipv4Addr,
    /// The agent's own health, reported in every answer.
    health: Arc<Mutex<ProxyHealth>>,
    listeners: BTreeMap<u16, Listener>,
    /// Ports whose bind failed: the Service and the error, as last logged.
    failed: BTreeMap<u16, (ObjectRef, String)>,
    /// Conflicts as last logged.
    conflicts: BTreeSet<(ObjectRef, u16)>,
}

impl HealthCheckServer {
    /// A server with no port open, that will bind its ports on `bind` (`0.0.0.0` in the agent)
    /// and report `health` as `serviceProxyHealthy`.
    #[must_use]
    pub fn new(bind: Ipv4Addr, health: Arc<Mutex<ProxyHealth>>) -> Self {
        Self { bind, health, listeners: BTreeMap::new(), failed: BTreeMap::new(), conflicts: BTreeSet::new() }
    }

    /// Ports open, in order.
    #[must_use]
    pub fn serving(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Ports that could not be opened (retried by the next update), in order.
    #[must_use]
    pub fn failed(&self) -> Vec<u16> {
        self.failed.keys().copied().collect()
    }

    /// Serves exactly `checks`: opens the new ports, closes those no longer wanted, updates the
    /// answers of the others in place, and retries the ports that failed to open.
    pub fn update(&mut self, checks: &BTreeMap<ObjectRef, HealthCheck>) {
        let plan = plan(checks);
        let conflicts: BTreeSet<(ObjectRef, u16)> = plan.conflicts.iter().map(|(s, p, _)| (s.clone(), *p)).collect();
        for (svc, port, winner) in &plan.conflicts {
            if !self.conflicts.contains(&(svc.clone(), *port)) {
                warn!(service = %svc, port, served_for = %winner, "health check node port already served for another Service; not served for this one");
            }
        }
        self.conflicts = conflicts;
        self.failed.retain(|port, _| plan.ports.contains_key(port));
        self.listeners.retain(|port, listener| {
            let keep = plan.ports.contains_key(port);
            if !keep {
                let answer = lock(&listener.answer);
                info!(service = %answer.service, port, "health check node port closed");
            }
            keep
        });
        for (port, answer) in plan.ports {
            if let Some(listener) = self.listeners.get(&port) {
                let mut current = lock(&listener.answer);
                if *current != answer {
                    debug!(service = %answer.service, port, local_endpoints = answer.local_endpoints, "health check updated");
                    *current = answer;
                }
                continue;
            }
            match bind(SocketAddr::from((self.bind, port))) {
                Ok(socket) => {
                    info!(service = %answer.service, port, local_endpoints = answer.local_endpoints, "health check node port open");
                    self.failed.remove(&port);
                    let answer = Arc::new(Mutex::new(answer));
                    let (shared, health) = (Arc::clone(&answer), Arc::clone(&self.health));
                    let respond = move |_path: &str| {
                        let healthy = lock(&health).is_healthy(Instant::now());
                        response(&lock(&shared), healthy)
                    };
                    let task = tokio::spawn(serve(socket, Arc::new(respond)));
                    self.listeners.insert(port, Listener { answer, task });
                }
                Err(e) => {
                    let failure = (answer.service, e.to_string());
                    if self.failed.get(&port) == Some(&failure) {
                        debug!(service = %failure.0, port, error = %e, "health check node port: bind failed again");
                    } else {
                        warn!(service = %failure.0, port, error = %e, "health check node port: bind failed; will retry");
                        self.failed.insert(port, failure);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper::header;
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::TcpStream,
    };

    use super::*;

    fn svc(name: &str) -> ObjectRef {
        let (namespace, name) = name.split_once('/').unwrap();
        ObjectRef::new(namespace, name)
    }

    fn checks(items: &[(&str, u16, usize)]) -> BTreeMap<ObjectRef, HealthCheck> {
        items
            .iter()
            .map(|&(name, node_port, local_endpoints)| (svc(name), HealthCheck { node_port, local_endpoints }))
            .collect()
    }

    #[tokio::test]
    async fn response_is_kube_proxys() {
        for (n, healthy, status) in [
            (2, true, StatusCode::OK),
            (0, true, StatusCode::SERVICE_UNAVAILABLE),
            (2, false, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let resp = response(&Answer { service: svc("shop/web"), local_endpoints: n }, healthy);
            assert_eq!(resp.status(), status);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(resp.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(resp.headers().len(), 2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let expected = format!(
                r#"{{"service":{{"namespace":"shop","name":"web"}},"localEndpoints":{n},"serviceProxyHealthy":{healthy}}}"#
            );
            assert_eq!(std::str::from_utf8(&body).unwrap(), expected);
        }
    }

    /// Agent health with `timeout` for changes to reach the maps; healthy until one is queued.
    fn health(timeout: Duration) -> Arc<Mutex<ProxyHealth>> {
        Arc::new(Mutex::new(ProxyHealth::new(timeout)))
    }

    #[test]
    fn first_service_in_name_order_gets_a_shared_port() {
        let p = plan(&checks(&[("b/lb", 32000, 1), ("a/lb", 32000, 0), ("a/other", 32001, 3)]));
        let expected: BTreeMap<u16, Answer> = [
            (32000, Answer { service: svc("a/lb"), local_endpoints: 0 }),
            (32001, Answer { service: svc("a/other"), local_endpoints: 3 }),
        ]
        .into();
        assert_eq!(p.ports, expected);
        assert_eq!(p.conflicts, vec![(svc("b/lb"), 32000, svc("a/lb"))]);
        assert_eq!(plan(&BTreeMap::new()), Plan::default());
    }

    /// A port nothing listens on right now (the kernel's choice, released at once).
    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
    }

    /// Sends one GET on `stream` (kept alive) and reads the response: status, headers
    /// (lower-case names), body.
    async fn get(stream: &mut BufReader<TcpStream>, path: &str) -> (u16, BTreeMap<String, String>, String) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n");
        stream.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut status_line = String::new();
        stream.read_line(&mut status_line).await.unwrap();
        let status = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let Some((name, value)) = line.trim_end().split_once(": ") else { break };
            headers.insert(name.to_ascii_lowercase(), value.to_owned());
        }
        let mut body = vec![0; headers["content-length"].parse().unwrap()];
        stream.read_exact(&mut body).await.unwrap();
        (status, headers, String::from_utf8(body).unwrap())
    }

    async fn connect(port: u16) -> BufReader<TcpStream> {
        BufReader::new(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.unwrap())
    }

    #[tokio::test]
    async fn serves_real_http_and_updates_in_place() {
        let port = free_port();
        // No time for changes to reach the maps: queueing one makes the agent unhealthy at once.
        let health = health(Duration::ZERO);
        let mut server = HealthCheckServer::new(Ipv4Addr::LOCALHOST, Arc::clone(&health));
        server.update(&checks(&[("shop/web", port, 2)]));
        assert_eq!(server.serving(), vec![port]);

        let mut conn = connect(port).await;
        let (status, headers, body) = get(&mut conn, "/healthz").await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(
            body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );

        // A change has waited too long for the maps: the agent is unhealthy, and says so.
        lock(&health).queued(Instant::now());
        let (status, _, body) = get(&mut conn, "/healthz").await;
        assert_eq!(status, 503);
        assert!(body.ends_with(r#""localEndpoints":2,"serviceProxyHealthy":false}"#), "{body}");
        lock(&health).updated(jiff::Timestamp::now());

        // The count drops to 0: the same connection (so the same listener) now gets 503.
        server.update(&checks(&[("shop/web", port, 0)]));
        let (status, _, body) = get(&mut conn, "/").await;
        assert_eq!(status, 503);
        assert!(body.contains(r#""localEndpoints":0"#), "{body}");

        // The health check goes away: the port closes.
        server.update(&BTreeMap::new());
        assert!(server.serving().is_empty());
        let closed = async {
            while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed).await.expect("port still open");
    }

    #[tokio::test]
    async fn a_port_in_use_is_retried_by_later_updates() {
        let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = blocker.local_addr().unwrap().port();
        let mut server = HealthCheckServer::new(Ipv4Addr::LOCALHOST, health(crate::health::proxy::HEALTH_TIMEOUT));
        let wanted = checks(&[("shop/web", port, 1)]);
        server.update(&wanted);
        assert_eq!((server.serving(), server.failed()), (vec![], vec![port]));
        server.update(&wanted);
        assert_eq!(server.failed(), vec![port], "still in use");

        drop(blocker);
        server.update(&wanted);
        assert_eq!((server.serving(), server.failed()), (vec![port], vec![]));
        let (status, _, _) = get(&mut connect(port).await, "/").await;
        assert_eq!(status, 200);
    }
}

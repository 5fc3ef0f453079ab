//! The agent's own health, reported as kube-proxy reports its own (`--healthz-bind-address`,
//! `pkg/proxy/healthcheck/proxy_health.go`): cloud load balancers probe `/healthz` on every
//! node for Services with `externalTrafficPolicy: Cluster`, and the health check node ports of
//! `Local` Services report it as `serviceProxyHealthy`.
//!
//! The agent is **healthy** unless a change it took in has waited longer than the health
//! timeout ([`HEALTH_TIMEOUT`], kube-proxy's default of twice its 30 s sync period) to reach the
//! maps: [`ProxyHealth::queued`] marks the oldest change not yet written,
//! [`ProxyHealth::updated`] clears it after a write without errors. A write that failed (a full
//! map, say) keeps the mark until a retry succeeds. Like kube-proxy it is healthy while it starts
//! up: changes count only once the source's initial state has been written.
//!
//! The **node is eligible** unless its Node object is being deleted or carries the cluster
//! autoscaler's `ToBeDeletedByClusterAutoscaler` taint (a node about to go should get no new
//! load balancer traffic). Without a Node object (manifests mode) it is eligible.
//!
//! Answers ([`ProxyHealth::answer`]), with `Content-Type: application/json` and
//! `X-Content-Type-Options: nosniff`:
//! - `/healthz`: 200 if healthy and eligible, else 503;
//!   `{"lastUpdated":"…","currentTime":"…","nodeEligible":true}`;
//! - `/livez`: the same without node eligibility; `{"lastUpdated":"…","currentTime":"…"}`;
//! - any other path: 404.
//!
//! As in kube-proxy, `lastUpdated` is the current time while healthy, and otherwise the time of
//! the last successful write (`0001-01-01T00:00:00Z` if none). Times are RFC 3339 in UTC (kube-proxy
//! prints Go's default time format; probes look only at the status).
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::http::{Server, json_response, lock};
use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

/// How long a change may wait for the maps before the agent reports itself unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_mins(1);
/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_BIND: &str = "0.0.0.0:10256";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// `lastUpdated` before any successful write: Go's zero time, as kube-proxy reports it.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// See the module documentation.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    last_updated: Option<Timestamp>,
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Healthz {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

impl ProxyHealth {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, last_updated: None, oldest_pending: None, node_eligible: true }
    }

    /// A change was taken in at `now` and is not written yet (kept if an older one is pending).
    pub fn queued(&mut self, now: Instant) {
        self.oldest_pending.get_or_insert(now);
    }

    /// Everything taken in is written, without errors, at `wall`.
    pub fn updated(&mut self, wall: Timestamp) {
        self.oldest_pending = None;
        self.last_updated = Some(wall);
    }

    /// No change has waited `timeout` or longer at `now`.
    #[must_use]
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.oldest_pending.is_none_or(|p| now.saturating_duration_since(p) < self.timeout)
    }

    /// Follows this node's Node object (`None`: none known). Returns the node's eligibility if
    /// it changed.
    pub fn set_node(&mut self, node: Option<&Node>) -> Option<bool> {
        let eligible = node.is_none_or(|n| {
            let taints = n.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
            n.metadata.deletion_timestamp.is_none() && !taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT)
        });
        (std::mem::replace(&mut self.node_eligible, eligible) != eligible).then_some(eligible)
    }

    #[must_use]
    pub fn node_eligible(&self) -> bool {
        self.node_eligible
    }

    /// The answer to a request for `path` at `now` (monotonic) and `wall` (the same instant).
    #[must_use]
    pub fn answer(&self, path: &str, now: Instant, wall: Timestamp) -> Response<Full<Bytes>> {
        let (healthy, node_eligible) = match path {
            "/healthz" => (self.is_healthy(now) && self.node_eligible, Some(self.node_eligible)),
            "/livez" => (self.is_healthy(now), None),
            _ => {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"404 page not found\n")));
                *resp.status_mut() = StatusCode::NOT_FOUND;
                return resp;
            }
        };
        let current_time = wall.to_string();
        let last_updated = if healthy {
            current_time.clone()
        } else {
            self.last_updated.map_or_else(|| NEVER.to_owned(), |t| t.to_string())
        };
        let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(status, &Healthz { last_updated, current_time, node_eligible })
    }
}

/// Serves `/healthz` and `/livez` on `--healthz-bind-address` (see [`Server`]).
pub struct HealthzServer(Server);

impl HealthzServer {
    /// `addr` `None`: disabled.
    #[must_use]
    pub fn new(addr: Option<SocketAddr>, health: Arc<Mutex<ProxyHealth>>) -> Self {
        let respond = move |path: &str| lock(&health).answer(path, Instant::now(), Timestamp::now());
        Self(Server::new("healthz (/healthz, /livez)", addr, Arc::new(respond)))
    }

    /// Opens the port if it is not open yet (the first call, or a retry after a failed bind).
    pub fn ensure(&mut self) {
        self.0.ensure();
    }

    /// Whether the port is open.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.0.is_open()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    async fn body(resp: Response<Full<Bytes>>) -> (u16, String) {
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[tokio::test]
    async fn a_change_late_for_the_maps_makes_it_unhealthy() {
        let t0 = Instant::now();
        let mut h = ProxyHealth::new(Duration::from_mins(1));
        assert!(h.is_healthy(t0), "healthy while starting up");
        h.queued(t0);
        h.queued(t0 + Duration::from_secs(30)); // the oldest pending change counts
        assert!(h.is_healthy(t0 + Duration::from_secs(59)));
        assert!(!h.is_healthy(t0 + Duration::from_mins(1)));

        let (status, text) = body(h.answer("/healthz", t0 + Duration::from_secs(61), wall(61))).await;
        assert_eq!(status, 503);
        assert_eq!(
            text,
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2027-01-15T08:01:01Z","nodeEligible":true}"#
        );

        h.updated(wall(62));
        assert!(h.is_healthy(t0 + Duration::from_secs(62)));
        let resp = h.answer("/healthz", t0 + Duration::from_secs(63), wall(63));
        assert_eq!(resp.headers()[hyper::header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[hyper::header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let (status, text) = body(resp).await;
        assert_eq!(status, 200);
        // While healthy, lastUpdated is the current time (kube-proxy's compatibility rule).
        assert_eq!(
            text,
            r#"{"lastUpdated":"2027-01-15T08:01:03Z","currentTime":"2027-01-15T08:01:03Z","nodeEligible":true}"#
        );

        // Late again: lastUpdated is the last successful write.
        h.queued(t0 + Duration::from_secs(100));
        let (status, text) = body(h.answer("/livez", t0 + Duration::from_secs(200), wall(200))).await;
        assert_eq!(status, 503);
        assert_eq!(text, r#"{"lastUpdated":"2027-01-15T08:01:02Z","currentTime":"2027-01-15T08:03:20Z"}"#);
        let (status, _) = body(h.answer("/metrics", t0, wall(0))).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn a_node_being_removed_fails_healthz_but_not_livez() {
        let t0 = Instant::now();
        let mut h = ProxyHealth::new(HEALTH_TIMEOUT);
        let tainted = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: TO_BE_DELETED_TAINT.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        let deleting = Node {
            metadata: ObjectMeta { deletion_timestamp: Some(Time(wall(0))), ..ObjectMeta::default() },
            ..Node::default()
        };
        let other_taint = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint { key: "dedicated".into(), effect: "NoSchedule".into(), ..Taint::default() }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        for (node, eligible) in
            [(Some(&tainted), false), (None, true), (Some(&deleting), false), (Some(&other_taint), true)]
        {
            h.set_node(node);
            assert_eq!(h.node_eligible(), eligible);
            let (status, text) = body(h.answer("/healthz", t0, wall(0))).await;
            assert_eq!(status, if eligible { 200 } else { 503 }, "{text}");
            assert!(text.ends_with(&format!(r#""nodeEligible":{eligible}}}"#)), "{text}");
            let (status, _) = body(h.answer("/livez", t0, wall(0))).await;
            assert_eq!(status, 200, "livez ignores the node");
        }
        assert_eq!(h.set_node(Some(&other_taint)), None, "no change reported");
        assert_eq!(h.set_node(Some(&tainted)), Some(false));
        assert_eq!(h.set_node(None), Some(true));
    }
}

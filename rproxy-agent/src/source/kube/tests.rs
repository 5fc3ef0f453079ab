//! The event mapping on its own, then the whole source against a fake API server behind kube's
//! mock client (`tower_test::mock`), which answers list requests from its state and keeps watch
//! responses open as streams the test writes events into. Time is paused (tokio's auto-advance),
//! so backoffs cost nothing and every wait is bounded.
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::channel::mpsc as body_channel;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use kube::{ResourceExt, client::Body};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};
use tower_test::mock;

use super::*;

// --- The event mapping -------------------------------------------------------------------------

fn service(name: &str, resource_version: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default", "resourceVersion": resource_version.to_string() },
        "spec": { "clusterIP": "10.96.0.10", "ports": [{ "port": 80, "protocol": "TCP" }] },
    })
}

fn slice(name: &str, resource_version: u32) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": resource_version.to_string(),
            "labels": { "kubernetes.io/service-name": "a" },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.0.0.1"] }],
    })
}

fn node(name: &str, resource_version: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "resourceVersion": resource_version.to_string() },
    })
}

fn object<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("test object")
}

fn key(object: &impl ResourceExt) -> String {
    let name = object.name_any();
    let version = object.resource_version().unwrap_or_default();
    match object.namespace() {
        Some(namespace) => format!("{namespace}/{name}@{version}"),
        None => format!("{name}@{version}"),
    }
}

fn keys<K: ResourceExt>(objects: &[K]) -> String {
    objects.iter().map(key).collect::<Vec<_>>().join(",")
}

/// An update as a short comparable string.
fn describe(update: &Update) -> String {
    match update {
        Update::ResetServices(objects) => format!("ResetServices [{}]", keys(objects)),
        Update::ResetSlices(objects) => format!("ResetSlices [{}]", keys(objects)),
        Update::ListStart(kind) => format!("ListStart {kind}"),
        Update::ListedService(object) => format!("ListedService {}", key(object.as_ref())),
        Update::ListedSlice(object) => format!("ListedSlice {}", key(object.as_ref())),
        Update::ListedNode(object) => format!("ListedNode {}", key(object.as_ref())),
        Update::ListDone(kind) => format!("ListDone {kind}"),
        Update::ApplyService(object) => format!("ApplyService {}", key(object.as_ref())),
        Update::DeleteService(object) => format!("DeleteService {}", key(object.as_ref())),
        Update::ApplySlice(object) => format!("ApplySlice {}", key(object.as_ref())),
        Update::DeleteSlice(object) => format!("DeleteSlice {}", key(object.as_ref())),
        Update::Node(Some(object)) => format!("Node {}", key(object.as_ref())),
        Update::Node(None) => "Node none".to_owned(),
        Update::Synced(kind) => format!("Synced {kind}"),
        Update::WatchLost(kind) => format!("WatchLost {kind}"),
    }
}

/// The kind an update is about.
fn kind_of(update: &Update) -> &'static str {
    match update {
        Update::ResetServices(_) | Update::ListedService(_) | Update::ApplyService(_) | Update::DeleteService(_) => {
            "Service"
        }
        Update::ResetSlices(_) | Update::ListedSlice(_) | Update::ApplySlice(_) | Update::DeleteSlice(_) => {
            "EndpointSlice"
        }
        Update::ListedNode(_) | Update::Node(_) => "Node",
        Update::ListStart(kind) | Update::ListDone(kind) | Update::Synced(kind) | Update::WatchLost(kind) => kind,
    }
}

/// The updates of a complete list of `kind` that gives the objects `keys`, then its `Synced`.
fn streamed(kind: &str, keys: &[&str]) -> Vec<String> {
    let listed = keys.iter().map(|key| format!("Listed{} {key}", if kind == "EndpointSlice" { "Slice" } else { kind }));
    [format!("ListStart {kind}")]
        .into_iter()
        .chain(listed)
        .chain([format!("ListDone {kind}"), format!("Synced {kind}")])
        .collect()
}

fn map_all<K: Watched>(mapper: &mut EventMapper<K>, events: Vec<Event<K>>) -> (Vec<String>, Vec<Option<usize>>) {
    let mut updates = Vec::new();
    let mut synced = Vec::new();
    for event in events {
        let step = mapper.map(event);
        updates.extend(step.updates.iter().map(describe));
        synced.push(step.synced);
    }
    (updates, synced)
}

#[test]
fn selectors_are_kube_proxys() {
    assert_eq!(LABEL_SELECTOR, "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
    assert_eq!(label_selector(), LABEL_SELECTOR);
    assert_eq!(node_field_selector("node-1"), "metadata.name=node-1");
}

#[test]
fn a_list_is_streamed_then_changes_pass_through() {
    let mut mapper = EventMapper::<Service>::default();
    let (updates, synced) = map_all(
        &mut mapper,
        vec![
            Event::Init,
            Event::InitApply(object(service("a", 1))),
            Event::InitApply(object(service("b", 2))),
            Event::InitDone,
            Event::Apply(object(service("c", 3))),
            Event::Delete(object(service("a", 4))),
        ],
    );
    let mut expected = streamed("Service", &["default/a@1", "default/b@2"]);
    expected.extend(["ApplyService default/c@3".to_owned(), "DeleteService default/a@4".to_owned()]);
    assert_eq!(updates, expected);
    assert_eq!(synced, [None, None, None, Some(2), None, None]);

    // A relist is a new complete list (the store drops what it lacks).
    let (updates, synced) =
        map_all(&mut mapper, vec![Event::Init, Event::InitApply(object(service("b", 5))), Event::InitDone]);
    assert_eq!(updates, streamed("Service", &["default/b@5"]));
    assert_eq!(synced, [None, None, Some(1)]);
}

#[test]
fn a_list_that_restarts_starts_a_new_list() {
    let mut mapper = EventMapper::<EndpointSlice>::default();
    let (updates, synced) = map_all(
        &mut mapper,
        vec![
            Event::Init,
            Event::InitApply(object(slice("a-1", 1))),
            Event::Init,
            Event::InitApply(object(slice("a-2", 2))),
            Event::InitDone,
            Event::Apply(object(slice("a-3", 3))),
            Event::Delete(object(slice("a-2", 4))),
        ],
    );
    // The second `ListStart` tells the store to drop a-1 (see the store's tests).
    let mut expected = vec!["ListStart EndpointSlice".to_owned(), "ListedSlice default/a-1@1".to_owned()];
    expected.extend(streamed("EndpointSlice", &["default/a-2@2"]));
    expected.extend(["ApplySlice default/a-3@3".to_owned(), "DeleteSlice default/a-2@4".to_owned()]);
    assert_eq!(updates, expected);
    assert_eq!(synced[4], Some(1));
}

#[test]
fn node_events() {
    let mut mapper = EventMapper::<Node>::default();
    let (updates, synced) = map_all(
        &mut mapper,
        vec![
            Event::Init,
            Event::InitDone,
            Event::Apply(object(node("node-1", 1))),
            Event::Delete(object(node("node-1", 2))),
            Event::Init,
            Event::InitApply(object(node("node-1", 3))),
            Event::InitDone,
        ],
    );
    let mut expected = streamed("Node", &[]);
    expected.extend(["Node node-1@1".to_owned(), "Node none".to_owned()]);
    expected.extend(streamed("Node", &["node-1@3"]));
    assert_eq!(updates, expected);
    assert_eq!(synced, [None, Some(0), None, None, None, None, Some(1)]);
}

#[test]
fn retries_stay_within_a_second_for_a_minute_then_slow_down() {
    let t0 = Instant::now();
    let mut retry = Retry::default();
    assert_eq!(retry.failing_for(t0), None);
    let mut now = t0;
    let mut delays = Vec::new();
    while now.duration_since(t0) < Retry::FAST_FOR {
        let delay = retry.failed(now);
        delays.push(delay);
        now += delay;
    }
    // 250 ms (±20 %), doubling, then never above a second (+20 % jitter).
    assert!(delays[0] >= Duration::from_millis(200) && delays[0] <= Duration::from_millis(300), "{delays:?}");
    assert!(delays.iter().all(|d| *d <= Retry::FAST_MAX.mul_f64(1.2)), "{delays:?}");
    assert!(delays.len() > 50, "{} tries in the first minute", delays.len());
    assert!(retry.failing_for(now).unwrap() >= Retry::FAST_FOR);
    // After a minute of failures: longer, up to 10 s.
    let mut later = Vec::new();
    for _ in 0..10 {
        let delay = retry.failed(now);
        later.push(delay);
        now += delay;
    }
    assert!(later.iter().all(|d| *d <= Retry::SLOW_MAX.mul_f64(1.2)), "{later:?}");
    assert!(later.last().unwrap() >= &Retry::SLOW_MAX.mul_f64(0.8), "{later:?}");
    // Quiet for a while: the next failure starts a new run, from 250 ms.
    now += Retry::QUIET;
    assert_eq!(retry.failing_for(now), None);
    assert!(retry.failed(now) <= Duration::from_millis(300));
    assert_eq!(retry.failing_for(now), Some(Duration::ZERO));
}

// --- The client --------------------------------------------------------------------------------

/// A self-signed CA certificate (public part only), so that the client builds a real rustls
/// configuration.
const TEST_CA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJpVENDQVMrZ0F3SUJBZ0lVZEw0Z0l5UFZPMENWUU5SRkVvS1hxdERLa2hzd0NnWUlLb1pJemowRUF3SXcKR1RFWE1CVUdBMVVFQXd3T2NuQnliM2g1TFhSbGMzUXRZMkV3SUJjTk1qWXhNVEl5TURFek5ESXpXaGdQTWpFeQpOakV3TWprd01UTTBNak5hTUJreEZ6QVZCZ05WQkFNTURuSndjbTk0ZVMxMFpYTjBMV05oTUZrd0V3WUhLb1pJCnpqMENBUVlJS29aSXpqMERBUWNEUWdBRTcyZFRoelkwREl2RnRWSW81Nko3NmxtTWpsczlFcVRzYmlJSEFaMzgKa1Uwc29SQlpDWkpDZVNVbTlvNzllSGxYZitTTDJKdDl5cTVtWkEyME5zZjhmS05UTUZFd0hRWURWUjBPQkJZRQpGSGMySll0aXVRaUJKTWF0RDg3OTl2ME9DZ1BQTUI4R0ExVWRJd1FZTUJhQUZIYzJKWXRpdVFpQkpNYXREODc5Cjl2ME9DZ1BQTUE4R0ExVWRFd0VCL3dRRk1BTUJBZjh3Q2dZSUtvWkl6ajBFQXdJRFNBQXdSUUlnVU5xd3B1U00KdXViMmRybUdQN3poaEpkeWxzMVdjSEhqVlc3UXlBQnk2M29DSVFDZkhnVjJLVjA4akVxREVScTdZMGtDbTdqTQo5djFrWk1EeE9VTjZjanJRU2c9PQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==";

#[tokio::test]
async fn client_from_a_kubeconfig_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    let kubeconfig = format!(
        "apiVersion: v1
kind: Config
current-context: test
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: {TEST_CA}
users:
- name: agent
  user:
    token: not-a-real-token
contexts:
- name: test
  context:
    cluster: test
    user: agent
    namespace: rproxy-test
"
    );
    std::fs::write(&path, kubeconfig).expect("write kubeconfig");
    let client = client(Some(&path)).await.expect("client from the kubeconfig");
    assert_eq!(client.default_namespace(), "rproxy-test");
}

#[tokio::test]
async fn client_names_the_kubeconfig_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing");
    let Err(err) = client(Some(&path)).await else { panic!("a client from a missing kubeconfig") };
    let Error::KubeClient { what, .. } = &err else { panic!("unexpected error {err}") };
    assert!(what.contains(&path.display().to_string()), "{what}");
}

// --- The source against a fake API server ------------------------------------------------------

/// Every wait on the mock is bounded by this much (virtual) time.
const WAIT: Duration = Duration::from_mins(1);
const NODE: &str = "node-1";
const SELECTOR_QUERY: &str = "labelSelector";

/// (kind, path of the cluster-wide collection, list apiVersion)
const KINDS: [(&str, &str, &str); 3] = [
    ("Service", "/api/v1/services", "v1"),
    ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1"),
    ("Node", "/api/v1/nodes", "v1"),
];

type Chunk = Result<Frame<Bytes>, Infallible>;
type MockBody = StreamBody<body_channel::UnboundedReceiver<Chunk>>;
type Query = HashMap<String, String>;

/// What the fake server holds for one kind.
#[derive(Default)]
struct KindState {
    items: Vec<Value>,
    resource_version: u32,
    /// HTTP statuses to answer the next list requests with, before answering normally.
    failing_lists: VecDeque<u16>,
    /// HTTP statuses to answer the next watch requests with.
    failing_watches: VecDeque<u16>,
}

#[derive(Default)]
struct FakeState {
    kinds: HashMap<&'static str, KindState>,
    /// Every request: kind, whether it was a watch, its decoded query.
    seen: Vec<(&'static str, bool, Query)>,
    /// Requests answered with a failure, and when the last one was.
    failures: usize,
    last_failure: Option<Instant>,
}

impl FakeState {
    fn kind(&mut self, kind: &'static str) -> &mut KindState {
        self.kinds.entry(kind).or_default()
    }

    fn failed(&mut self) {
        self.failures += 1;
        self.last_failure = Some(Instant::now());
    }

    fn set(&mut self, kind: &'static str, resource_version: u32, items: Vec<Value>) {
        let state = self.kind(kind);
        state.resource_version = resource_version;
        state.items = items;
    }
}

/// An open watch response: the test writes events into it; dropping it ends the response.
struct Watch {
    query: Query,
    body: body_channel::UnboundedSender<Chunk>,
}

impl Watch {
    fn event(&self, kind: &str, object: &Value) {
        let line = format!("{}\n", json!({ "type": kind, "object": object }));
        self.body.unbounded_send(Ok(Frame::data(Bytes::from(line)))).expect("the watcher closed the watch");
    }
}

fn status(code: u16) -> Value {
    let (reason, message) = match code {
        410 => ("Expired", "too old resource version"),
        404 => ("NotFound", "the server could not find the requested resource"),
        _ => ("InternalError", "an error on the server has prevented the request from succeeding"),
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn full_response(code: u16, value: &Value) -> Response<MockBody> {
    let (tx, rx) = body_channel::unbounded();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(value.to_string())))).expect("open channel");
    let mut response = Response::new(StreamBody::new(rx));
    *response.status_mut() = StatusCode::from_u16(code).expect("status code");
    response
}

/// Answers one request like the API server would.
fn answer(
    request: &Request<Body>,
    state: &Mutex<FakeState>,
    watches: &HashMap<&'static str, mpsc::UnboundedSender<Watch>>,
) -> Response<MockBody> {
    let Some(&(kind, _, api_version)) = KINDS.iter().find(|(_, path, _)| *path == request.uri().path()) else {
        return full_response(404, &status(404));
    };
    let query: Query =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    let watch = query.get("watch").is_some_and(|value| value == "true");
    let mut state = state.lock().expect("fake state");
    state.seen.push((kind, watch, query.clone()));
    let kind_state = state.kind(kind);
    if watch {
        if let Some(code) = kind_state.failing_watches.pop_front() {
            state.failed();
            return full_response(code, &status(code));
        }
        let (body, rx) = body_channel::unbounded();
        // The test may not look at this watch; it then stays open until the test ends.
        let _ = watches[kind].send(Watch { query, body });
        return Response::new(StreamBody::new(rx));
    }
    if let Some(code) = kind_state.failing_lists.pop_front() {
        state.failed();
        return full_response(code, &status(code));
    }
    // Items of a list come without apiVersion and kind.
    let items: Vec<Value> = kind_state
        .items
        .iter()
        .cloned()
        .map(|mut item| {
            if let Some(fields) = item.as_object_mut() {
                fields.remove("apiVersion");
                fields.remove("kind");
            }
            item
        })
        .collect();
    let list = json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": { "resourceVersion": kind_state.resource_version.to_string() },
        "items": items,
    });
    full_response(200, &list)
}

/// The source running against the fake server.
struct Harness {
    state: Arc<Mutex<FakeState>>,
    watches: HashMap<&'static str, mpsc::UnboundedReceiver<Watch>>,
    updates: mpsc::Receiver<Update>,
    stats: Arc<Stats>,
    source: JoinHandle<()>,
}

impl Harness {
    /// A server with Services `a`, `b` (list version 100), slice `a-1` (200) and this node (300),
    /// changed by `setup`.
    fn start(setup: impl FnOnce(&mut FakeState)) -> Self {
        let mut fake = FakeState::default();
        fake.set("Service", 100, vec![service("a", 1), service("b", 2)]);
        fake.set("EndpointSlice", 200, vec![slice("a-1", 3)]);
        fake.set("Node", 300, vec![node(NODE, 4)]);
        setup(&mut fake);
        let shared = Arc::new(Mutex::new(fake));

        let mut senders = HashMap::new();
        let mut watches = HashMap::new();
        for (kind, _, _) in KINDS {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(kind, tx);
            watches.insert(kind, rx);
        }
        let (service, mut handle) = mock::pair::<Request<Body>, Response<MockBody>>();
        let server_state = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                respond.send_response(answer(&request, &server_state, &senders));
            }
        });

        let (tx, updates) = mpsc::channel(16);
        let stats = Arc::new(Stats::default());
        let source = tokio::spawn(run(Client::new(service, "default"), NODE.to_owned(), tx, Arc::clone(&stats)));
        Self { state: shared, watches, updates, stats, source }
    }

    async fn next_update(&mut self) -> String {
        let update = timeout(WAIT, self.updates.recv()).await.expect("no update in time").expect("the source ended");
        describe(&update)
    }

    /// Updates until each of `kinds` sent `Synced`, by kind.
    async fn until_synced(&mut self, kinds: &[&str]) -> HashMap<&'static str, Vec<String>> {
        let mut by_kind: HashMap<&'static str, Vec<String>> = HashMap::new();
        let mut waiting: Vec<&str> = kinds.to_vec();
        while !waiting.is_empty() {
            let update = timeout(WAIT, self.updates.recv()).await.expect("not synced in time").expect("source ended");
            if let Update::Synced(kind) = update {
                waiting.retain(|waited| *waited != kind);
            }
            by_kind.entry(kind_of(&update)).or_default().push(describe(&update));
        }
        by_kind
    }

    /// The next watch request for `kind`, still open.
    async fn next_watch(&mut self, kind: &str) -> Watch {
        let watches = self.watches.get_mut(kind).expect("known kind");
        timeout(WAIT, watches.recv()).await.expect("no watch in time").expect("server ended")
    }

    /// The queries of the list (`watch` false) or watch requests for `kind` so far.
    fn seen(&self, kind: &str, watch: bool) -> Vec<Query> {
        let state = self.state.lock().expect("fake state");
        state.seen.iter().filter(|seen| seen.0 == kind && seen.1 == watch).map(|seen| seen.2.clone()).collect()
    }

    fn change(&self, change: impl FnOnce(&mut FakeState)) {
        change(&mut self.state.lock().expect("fake state"));
    }

    /// Asserts that no update comes for a while.
    async fn assert_quiet(&mut self) {
        if let Ok(update) = timeout(Duration::from_secs(5), self.updates.recv()).await {
            panic!("unexpected update {:?}", update.as_ref().map(describe));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn initial_lists_reset_and_sync() {
    let mut harness = Harness::start(|_| {});
    let updates = harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    assert_eq!(updates["Service"], streamed("Service", &["default/a@1", "default/b@2"]));
    assert_eq!(updates["EndpointSlice"], streamed("EndpointSlice", &["default/a-1@3"]));
    assert_eq!(updates["Node"], streamed("Node", &["node-1@4"]));
    assert!(harness.stats.all_synced());
    for kind in [&harness.stats.services, &harness.stats.slices, &harness.stats.node] {
        assert_eq!((kind.errors(), kind.relists()), (0, 0));
    }
    harness.assert_quiet().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_node_is_none() {
    let mut harness = Harness::start(|fake| fake.set("Node", 300, Vec::new()));
    let updates = harness.until_synced(&["Node"]).await;
    assert_eq!(updates["Node"], streamed("Node", &[]));
}

#[tokio::test(start_paused = true)]
async fn lists_and_watches_carry_the_selectors() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    for (kind, version) in [("Service", "100"), ("EndpointSlice", "200"), ("Node", "300")] {
        let watch = harness.next_watch(kind).await;
        let lists = harness.seen(kind, false);
        assert_eq!(lists.len(), 1, "{kind}: {lists:?}");
        let list = &lists[0];
        let watch_query = &watch.query;
        assert_eq!(harness.seen(kind, true), std::slice::from_ref(watch_query));

        assert_eq!(watch_query.get("watch").map(String::as_str), Some("true"), "{kind}");
        assert_eq!(watch_query.get("allowWatchBookmarks").map(String::as_str), Some("true"), "{kind}");
        assert_eq!(watch_query.get("resourceVersion").map(String::as_str), Some(version), "{kind}");
        for query in [list, watch_query] {
            let (labels, fields) = (query.get(SELECTOR_QUERY), query.get("fieldSelector"));
            if kind == "Node" {
                assert_eq!((labels, fields.map(String::as_str)), (None, Some("metadata.name=node-1")));
            } else {
                assert_eq!((labels.map(String::as_str), fields), (Some(LABEL_SELECTOR), None), "{kind}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn watch_events_apply_and_delete() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;

    let services = harness.next_watch("Service").await;
    services.event("ADDED", &service("c", 101));
    assert_eq!(harness.next_update().await, "ApplyService default/c@101");
    services.event("MODIFIED", &service("c", 102));
    assert_eq!(harness.next_update().await, "ApplyService default/c@102");
    services.event("DELETED", &service("a", 103));
    assert_eq!(harness.next_update().await, "DeleteService default/a@103");

    let slices = harness.next_watch("EndpointSlice").await;
    slices.event("ADDED", &slice("c-1", 201));
    assert_eq!(harness.next_update().await, "ApplySlice default/c-1@201");
    slices.event("DELETED", &slice("a-1", 202));
    assert_eq!(harness.next_update().await, "DeleteSlice default/a-1@202");

    let nodes = harness.next_watch("Node").await;
    nodes.event("MODIFIED", &node(NODE, 301));
    assert_eq!(harness.next_update().await, "Node node-1@301");
    nodes.event("DELETED", &node(NODE, 302));
    assert_eq!(harness.next_update().await, "Node none");
    nodes.event("ADDED", &node(NODE, 303));
    assert_eq!(harness.next_update().await, "Node node-1@303");

    // A bookmark moves the resource version and gives no update; a watch that ends resumes
    // from there, without a relist.
    services
        .event("BOOKMARK", &json!({ "kind": "Service", "apiVersion": "v1", "metadata": { "resourceVersion": "150" } }));
    drop(services);
    let services = harness.next_watch("Service").await;
    assert_eq!(services.query.get("resourceVersion").map(String::as_str), Some("150"));
    services.event("ADDED", &service("d", 151));
    assert_eq!(harness.next_update().await, "ApplyService default/d@151");
    assert_eq!(harness.seen("Service", false).len(), 1);
    assert_eq!(harness.stats.services.errors(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_expired_watch_event_relists() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    let services = harness.next_watch("Service").await;

    // Service b is deleted while the watch is behind.
    harness.change(|fake| fake.set("Service", 120, vec![service("a", 1)]));
    services.event("ERROR", &status(410));
    assert_eq!(harness.next_update().await, "WatchLost Service");
    for expected in streamed("Service", &["default/a@1"]) {
        assert_eq!(harness.next_update().await, expected);
    }

    let services = harness.next_watch("Service").await;
    assert_eq!(services.query.get("resourceVersion").map(String::as_str), Some("120"));
    assert_eq!(harness.seen("Service", false).len(), 2);
    assert_eq!(harness.seen("EndpointSlice", false).len(), 1);
    assert_eq!((harness.stats.services.errors(), harness.stats.services.relists()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn an_http_410_on_the_watch_relists() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    let slices = harness.next_watch("EndpointSlice").await;

    // The watch ends; its resumption is answered 410 Gone, and slice a-1 is gone meanwhile.
    harness.change(|fake| {
        fake.set("EndpointSlice", 220, vec![slice("a-2", 210)]);
        fake.kind("EndpointSlice").failing_watches.push_back(410);
    });
    drop(slices);
    assert_eq!(harness.next_update().await, "WatchLost EndpointSlice");
    for expected in streamed("EndpointSlice", &["default/a-2@210"]) {
        assert_eq!(harness.next_update().await, expected);
    }

    let slices = harness.next_watch("EndpointSlice").await;
    assert_eq!(slices.query.get("resourceVersion").map(String::as_str), Some("220"));
    let watches = harness.seen("EndpointSlice", true);
    let versions: Vec<_> = watches.iter().map(|query| query["resourceVersion"].as_str()).collect();
    assert_eq!(versions, ["200", "200", "220"]);
    assert_eq!((harness.stats.slices.errors(), harness.stats.slices.relists()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn errors_do_not_stop_the_source() {
    let mut harness = Harness::start(|fake| {
        fake.kind("EndpointSlice").failing_lists.extend([500, 503]);
    });
    // The slices are listed at the third try; the agent hears that the watch broke once.
    let updates = harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    let mut expected = vec!["ListStart EndpointSlice".to_owned(), "WatchLost EndpointSlice".to_owned()];
    expected.push("ListStart EndpointSlice".to_owned());
    expected.extend(streamed("EndpointSlice", &["default/a-1@3"]));
    assert_eq!(updates["EndpointSlice"], expected);
    assert_eq!(harness.seen("EndpointSlice", false).len(), 3);
    assert_eq!((harness.stats.slices.errors(), harness.stats.slices.relists()), (2, 2));

    // An error event on an open watch: the agent is told, and the kind is listed again, with
    // what changed meanwhile.
    let services = harness.next_watch("Service").await;
    harness.change(|fake| fake.set("Service", 130, vec![service("a", 1), service("c", 101)]));
    services.event("ERROR", &status(500));
    assert_eq!(harness.next_update().await, "WatchLost Service");
    for expected in streamed("Service", &["default/a@1", "default/c@101"]) {
        assert_eq!(harness.next_update().await, expected);
    }
    assert_eq!((harness.stats.services.errors(), harness.stats.services.relists()), (1, 1));

    // A failed watch request likewise (here, the one that follows a watch that ended).
    let nodes = harness.next_watch("Node").await;
    harness.change(|fake| fake.kind("Node").failing_watches.push_back(500));
    drop(nodes);
    let updates = harness.until_synced(&["Node"]).await;
    let mut expected = vec!["WatchLost Node".to_owned()];
    expected.extend(streamed("Node", &["node-1@4"]));
    assert_eq!(updates["Node"], expected);
    assert_eq!((harness.stats.node.errors(), harness.stats.node.relists()), (1, 1));
    assert_eq!(harness.seen("Node", false).len(), 2);
}

/// The API server away for about twenty seconds (every list and watch refused), while a Service
/// and its slice are created: both watches catch up within about a second of the server
/// answering again, each with a complete list that holds the new objects.
#[tokio::test(start_paused = true)]
async fn an_outage_is_caught_up_about_a_second_after_the_server_answers() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    let (services, slices) = (harness.next_watch("Service").await, harness.next_watch("EndpointSlice").await);
    let outage_start = Instant::now();
    harness.change(|fake| {
        for kind in ["Service", "EndpointSlice"] {
            fake.kind(kind).failing_watches.push_back(503);
            fake.kind(kind).failing_lists.extend([503; 25]);
        }
        fake.set("Service", 140, vec![service("a", 1), service("b", 2), service("new", 139)]);
        fake.set("EndpointSlice", 240, vec![slice("a-1", 3), slice("new-1", 239)]);
    });
    drop((services, slices));
    let updates = harness.until_synced(&["Service", "EndpointSlice"]).await;
    let caught_up = Instant::now();
    let (last_failure, failures) = {
        let state = harness.state.lock().expect("fake state");
        (state.last_failure.expect("requests failed"), state.failures)
    };
    assert_eq!(failures, 52, "every refusal was used up");
    assert!(last_failure.duration_since(outage_start) >= Duration::from_secs(15), "the outage was too short");
    let lag = caught_up.duration_since(last_failure);
    assert!(lag <= Retry::FAST_MAX.mul_f64(1.25), "caught up {lag:?} after the server answered");
    assert_eq!(
        updates["Service"].iter().filter(|u| u.starts_with("WatchLost")).count(),
        1,
        "one WatchLost per outage: {:?}",
        updates["Service"]
    );
    let services_tail: Vec<String> = updates["Service"].iter().rev().take(6).rev().cloned().collect();
    assert_eq!(services_tail, streamed("Service", &["default/a@1", "default/b@2", "default/new@139"]));
    let slices_tail: Vec<String> = updates["EndpointSlice"].iter().rev().take(5).rev().cloned().collect();
    assert_eq!(slices_tail, streamed("EndpointSlice", &["default/a-1@3", "default/new-1@239"]));
}

#[tokio::test(start_paused = true)]
async fn ends_when_the_receiver_is_dropped() {
    let mut harness = Harness::start(|_| {});
    harness.until_synced(&["Service", "EndpointSlice", "Node"]).await;
    drop(harness.updates);
    timeout(WAIT, harness.source).await.expect("the source did not end").expect("the source panicked");
}

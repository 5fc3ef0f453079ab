//! Pure translation: Kubernetes Services and `EndpointSlices` → [`Desired`] map state, plus the
//! [`Problem`]s found on the way. No I/O; the same objects in any order give the same result.
//!
//! Scope for now: cluster IP frontends (for Services of type `ClusterIP`, `NodePort` and
//! `LoadBalancer`), IPv4 only, TCP and UDP. The rules follow kube-proxy (`pkg/proxy`:
//! `endpointslicecache.go` for slices, `topology.go` for endpoint categorization):
//!
//! - slices belong to the Service named by their `kubernetes.io/service-name` label in their
//!   namespace; the slices of one Service are merged and duplicate endpoints removed;
//! - a service port takes its backend port from the slice port with the same name and protocol
//!   (the endpoints controller has already resolved named `targetPort`s into the slices);
//! - ready endpoints take new connections; when none is ready, serving+terminating ones do;
//!   terminating endpoints that take no new connections are kept as draining.
//!
//! A bad object (or the bad part of one) is skipped with a [`Problem`]; everything else is still
//! translated. Nothing here panics on user data.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use rproxy_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_ITP_LOCAL};
use tracing::debug;

use crate::model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Problem, Protocol, ServiceEntry};

/// Label that ties an `EndpointSlice` to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// `ClientIP` affinity timeout when the Service sets none (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest `ClientIP` affinity timeout Kubernetes accepts (one day).
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;
const IPV6_UNSUPPORTED: &str = "IPv6 is not supported by the datapath yet";
const SERVICE: &str = "Service";
const SLICE: &str = "EndpointSlice";

/// The Kubernetes objects the translation reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Objects {
    /// Moves every object of `other` into `self`.
    pub fn append(&mut self, mut other: Self) {
        self.services.append(&mut other.services);
        self.slices.append(&mut other.slices);
    }
}

/// Result of [`translate`]: the desired map state and what was skipped, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    /// Sorted (by kind, object, reason) and without duplicates.
    pub problems: Vec<Problem>,
}

/// Translates Services and `EndpointSlices` into the desired state of the maps. `node_name` is
/// this node's name (it sets [`Backend::local`]).
#[must_use]
pub fn translate(objects: &Objects, node_name: &str) -> Translation {
    let mut problems = Vec::new();
    let plans = plan_services(&objects.services, &mut problems);
    let endpoints = collect_endpoints(&objects.slices, &plans, node_name, &mut problems);
    let desired = build_desired(&plans, &endpoints, &mut problems);
    problems.sort_by(|a, b| (a.kind, &a.object, &a.reason).cmp(&(b.kind, &b.object, &b.reason)));
    problems.dedup();
    Translation { desired, problems }
}

/// [`translate`] over borrowed objects (stand-in until the borrowed translation lands).
#[must_use]
pub fn translate_refs(services: &[&Service], slices: &[&EndpointSlice], node_name: &str) -> Translation {
    let objects = Objects {
        services: services.iter().map(|s| (*s).clone()).collect(),
        slices: slices.iter().map(|s| (*s).clone()).collect(),
    };
    translate(&objects, node_name)
}

// ---------------------------------------------------------------------------------------------
// Services

/// What a valid Service contributes: its frontends are `addrs × ports`.
#[derive(Debug)]
struct ServicePlan {
    /// IPv4 cluster IPs, sorted, without duplicates.
    addrs: Vec<Ipv4Addr>,
    /// Valid ports, in spec order, unique by (port, protocol).
    ports: Vec<PortPlan>,
    flags: u16,
    affinity_timeout: u32,
    publish_not_ready: bool,
}

/// One valid service port.
#[derive(Debug)]
struct PortPlan {
    /// "" when unnamed.
    name: String,
    port: u16,
    proto: Protocol,
}

/// Every Service that has a name: `Some` plan if it produces frontends, `None` if it exists but
/// is ignored (headless, `ExternalName`…) or rejected. Slices of a `None` Service are unused
/// without a problem.
type ServicePlans = BTreeMap<ObjectRef, Option<ServicePlan>>;

fn plan_services(services: &[Service], problems: &mut Vec<Problem>) -> ServicePlans {
    let mut by_ref: BTreeMap<ObjectRef, Vec<&Service>> = BTreeMap::new();
    for svc in services {
        match object_ref(&svc.metadata) {
            Some(svc_ref) => by_ref.entry(svc_ref).or_default().push(svc),
            None => problems.push(problem(SERVICE, &unnamed(&svc.metadata), "missing metadata.name")),
        }
    }
    by_ref
        .into_iter()
        .map(|(svc_ref, definitions)| {
            let plan = match definitions.split_first() {
                Some((first, rest)) if rest.iter().all(|other| other == first) => {
                    plan_service(&svc_ref, first, problems)
                }
                _ => {
                    let reason = "defined more than once with different content; all definitions ignored";
                    problems.push(problem(SERVICE, &svc_ref, reason));
                    None
                }
            };
            (svc_ref, plan)
        })
        .collect()
}

/// Validates one Service. Returns `None` when it produces no frontend at all.
fn plan_service(svc_ref: &ObjectRef, svc: &Service, problems: &mut Vec<Problem>) -> Option<ServicePlan> {
    let mut report = |reason: String| problems.push(problem(SERVICE, svc_ref, reason));
    let Some(spec) = &svc.spec else {
        debug!(service = %svc_ref, "ignoring Service without spec");
        return None;
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") => {
            debug!(service = %svc_ref, "ignoring ExternalName Service");
            return None;
        }
        Some(other) => {
            report(format!("unknown type {other:?}"));
            return None;
        }
    }
    let raw_ips = cluster_ips(spec);
    if raw_ips.is_empty() {
        debug!(service = %svc_ref, "ignoring Service without clusterIP");
        return None;
    }
    if raw_ips.contains(&"None") {
        debug!(service = %svc_ref, "ignoring headless Service");
        return None;
    }
    let addrs = parse_cluster_ips(&raw_ips, &mut report);
    let ports = plan_ports(spec.ports.as_deref().unwrap_or_default(), &mut report);
    let (flags, affinity_timeout) = service_flags(spec, &mut report);
    Some(ServicePlan {
        addrs,
        ports,
        flags,
        affinity_timeout,
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
    })
}

/// `spec.clusterIPs`, or `spec.clusterIP` when that is empty; empty strings dropped.
fn cluster_ips(spec: &ServiceSpec) -> Vec<&str> {
    let ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    ips.into_iter().filter(|ip| !ip.is_empty()).collect()
}

/// Keeps the IPv4 cluster IPs (sorted, deduplicated); reports IPv6 and unparsable ones.
fn parse_cluster_ips(raw_ips: &[&str], report: &mut impl FnMut(String)) -> Vec<Ipv4Addr> {
    let mut addrs = BTreeSet::new();
    for raw in raw_ips {
        match parse_ip(raw) {
            Some(IpAddr::V4(addr)) => {
                addrs.insert(addr);
            }
            Some(IpAddr::V6(_)) => report(format!("clusterIP {raw}: {IPV6_UNSUPPORTED}")),
            None => report(format!("invalid clusterIP {raw:?}")),
        }
    }
    addrs.into_iter().collect()
}

/// Keeps the valid ports, unique by (port, protocol); reports the others.
fn plan_ports(ports: &[ServicePort], report: &mut impl FnMut(String)) -> Vec<PortPlan> {
    let mut seen = BTreeSet::new();
    let mut plans = Vec::new();
    for port in ports {
        let label = format!("port {}/{}", port.port, port.protocol.as_deref().unwrap_or("TCP"));
        match plan_port(port) {
            Ok(plan) if seen.insert((plan.port, plan.proto)) => plans.push(plan),
            Ok(_) => report(format!("{label}: duplicate of an earlier port; ignored")),
            Err(reason) => report(format!("{label}: {reason}")),
        }
    }
    plans
}

fn plan_port(port: &ServicePort) -> Result<PortPlan, String> {
    let proto = parse_protocol(port.protocol.as_deref())?;
    let number = valid_port(port.port).ok_or_else(|| format!("port {} is out of range 1-65535", port.port))?;
    // nodePort 0 means "not set", as in the Kubernetes API.
    if let Some(node_port) = port.node_port.filter(|&n| n != 0)
        && valid_port(node_port).is_none()
    {
        return Err(format!("nodePort {node_port} is out of range 1-65535"));
    }
    Ok(PortPlan { name: port.name.clone().unwrap_or_default(), port: number, proto })
}

/// TCP when unset. SCTP and anything else are refused.
fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err("SCTP is not supported by the datapath".to_owned()),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

/// A port number in `1..=65535`.
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// `SVC_F_*` flags and the affinity timeout (0 without affinity). Unknown policy values are
/// reported and read as the Kubernetes default.
fn service_flags(spec: &ServiceSpec, report: &mut impl FnMut(String)) -> (u16, u32) {
    let mut flags = SVC_F_CLUSTER_IP;
    let mut affinity_timeout = 0;
    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            flags |= SVC_F_AFFINITY;
            affinity_timeout = affinity_timeout_of(spec, report);
        }
        Some(other) => report(format!("unknown sessionAffinity {other:?}; using None")),
    }
    match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => {}
        Some("Local") => flags |= SVC_F_ITP_LOCAL,
        Some(other) => report(format!("unknown internalTrafficPolicy {other:?}; using Cluster")),
    }
    (flags, affinity_timeout)
}

fn affinity_timeout_of(spec: &ServiceSpec, report: &mut impl FnMut(String)) -> u32 {
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds);
    let Some(seconds) = configured else {
        return DEFAULT_AFFINITY_TIMEOUT;
    };
    if let Ok(timeout @ 1..=MAX_AFFINITY_TIMEOUT) = u32::try_from(seconds) {
        timeout
    } else {
        report(format!(
            "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of range 1-{MAX_AFFINITY_TIMEOUT}; \
             using {DEFAULT_AFFINITY_TIMEOUT}"
        ));
        DEFAULT_AFFINITY_TIMEOUT
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints

/// Endpoint conditions with the API's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Conditions {
    /// Defaults as kube-proxy's `endpointslicecache.go` and the discovery/v1 API reference
    /// define them: `ready` and `serving` unset mean true, `terminating` unset means false.
    /// With `publishNotReadyAddresses` every endpoint counts as ready.
    fn of(endpoint: &Endpoint, publish_not_ready: bool) -> Self {
        let conditions = endpoint.conditions.as_ref();
        Self {
            ready: publish_not_ready || conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        }
    }
}

/// One usable endpoint address of a slice.
#[derive(Clone, Copy, Debug)]
struct EndpointInfo {
    addr: Ipv4Addr,
    conditions: Conditions,
    local: bool,
}

impl EndpointInfo {
    /// Order of preference when the same backend appears twice (in two slices, say): the most
    /// available copy wins, then the local one, so the result does not depend on input order.
    fn rank(self) -> (bool, bool, bool, bool) {
        let c = self.conditions;
        (c.ready, c.serving, !c.terminating, self.local)
    }
}

/// The merged endpoints of one service port, keyed (and so deduplicated) by backend address.
type PortEndpoints = BTreeMap<BackendAddr, EndpointInfo>;

/// Per Service, the endpoints of each of its planned ports (same order as `ServicePlan::ports`).
type EndpointMap = BTreeMap<ObjectRef, Vec<PortEndpoints>>;

fn collect_endpoints(
    slices: &[EndpointSlice],
    plans: &ServicePlans,
    node_name: &str,
    problems: &mut Vec<Problem>,
) -> EndpointMap {
    let mut endpoints = EndpointMap::new();
    for slice in slices {
        let Some(slice_ref) = object_ref(&slice.metadata) else {
            problems.push(problem(SLICE, &unnamed(&slice.metadata), "missing metadata.name"));
            continue;
        };
        let mut report = |reason: String| problems.push(problem(SLICE, &slice_ref, reason));
        let Some((svc_ref, plan)) = owning_service(slice, &slice_ref, plans, &mut report) else {
            continue;
        };
        if !is_ipv4_slice(slice, &slice_ref, &mut report) {
            continue;
        }
        let infos = slice_endpoints(slice, plan.publish_not_ready, node_name, &mut report);
        let slice_ports = slice_ports(slice, &mut report);
        let per_port = endpoints.entry(svc_ref).or_insert_with(|| vec![PortEndpoints::new(); plan.ports.len()]);
        for (port, merged) in plan.ports.iter().zip(per_port) {
            if let Some(target) = matching_port(&slice_ports, port) {
                for info in &infos {
                    merge(merged, BackendAddr { addr: info.addr, port: target, proto: port.proto }, *info);
                }
            }
        }
    }
    endpoints
}

/// The Service a slice belongs to, if it produces frontends. Reports a slice without the
/// service-name label or whose Service does not exist.
fn owning_service<'p>(
    slice: &EndpointSlice,
    slice_ref: &ObjectRef,
    plans: &'p ServicePlans,
    report: &mut impl FnMut(String),
) -> Option<(ObjectRef, &'p ServicePlan)> {
    let label = slice.metadata.labels.as_ref().and_then(|labels| labels.get(SERVICE_NAME_LABEL));
    let Some(name) = label.filter(|name| !name.is_empty()) else {
        report(format!("missing label {SERVICE_NAME_LABEL}"));
        return None;
    };
    let svc_ref = ObjectRef { namespace: slice_ref.namespace.clone(), name: name.clone() };
    match plans.get(&svc_ref) {
        None => {
            report(format!("no Service {svc_ref} for this slice"));
            None
        }
        Some(None) => {
            debug!(slice = %slice_ref, service = %svc_ref, "slice unused: its Service has no frontend");
            None
        }
        Some(Some(plan)) => Some((svc_ref, plan)),
    }
}

/// Only IPv4 slices are used; IPv6 ones are reported, FQDN ones ignored.
fn is_ipv4_slice(slice: &EndpointSlice, slice_ref: &ObjectRef, report: &mut impl FnMut(String)) -> bool {
    match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => {
            report(format!("addressType IPv6: {IPV6_UNSUPPORTED}"));
            false
        }
        "FQDN" => {
            debug!(slice = %slice_ref, "ignoring FQDN slice");
            false
        }
        other => {
            report(format!("unknown addressType {other:?}"));
            false
        }
    }
}

/// The slice's endpoints with a usable IPv4 address (the first address, as kube-proxy does).
fn slice_endpoints(
    slice: &EndpointSlice,
    publish_not_ready: bool,
    node_name: &str,
    report: &mut impl FnMut(String),
) -> Vec<EndpointInfo> {
    let mut infos = Vec::new();
    for endpoint in slice.endpoints.as_deref().unwrap_or_default() {
        let Some(raw) = endpoint.addresses.first() else {
            report("endpoint without address; ignored".to_owned());
            continue;
        };
        match parse_ip(raw) {
            Some(IpAddr::V4(addr)) => infos.push(EndpointInfo {
                addr,
                conditions: Conditions::of(endpoint, publish_not_ready),
                local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
            }),
            Some(IpAddr::V6(_)) => report(format!("endpoint {raw}: {IPV6_UNSUPPORTED}")),
            None => report(format!("invalid endpoint address {raw:?}")),
        }
    }
    infos
}

/// A slice port: name ("" when unnamed), protocol (`None` when not one we support), number.
struct SlicePort<'a> {
    name: &'a str,
    proto: Option<Protocol>,
    port: u16,
}

/// The slice's ports with a valid number; reports the others.
fn slice_ports<'s>(slice: &'s EndpointSlice, report: &mut impl FnMut(String)) -> Vec<SlicePort<'s>> {
    let mut ports = Vec::new();
    for EndpointPort { name, port, protocol, .. } in slice.ports.as_deref().unwrap_or_default() {
        let name = name.as_deref().unwrap_or_default();
        if let Some(port) = port.and_then(valid_port) {
            ports.push(SlicePort { name, proto: parse_protocol(protocol.as_deref()).ok(), port });
        } else {
            let number = port.map_or_else(|| "unset".to_owned(), |p| p.to_string());
            report(format!("port {name:?}: invalid port number {number}; ignored"));
        }
    }
    ports
}

/// The backend port for a service port: the slice port with the same name and protocol.
fn matching_port(slice_ports: &[SlicePort<'_>], port: &PortPlan) -> Option<u16> {
    slice_ports
        .iter()
        .find(|candidate| candidate.name == port.name && candidate.proto == Some(port.proto))
        .map(|candidate| candidate.port)
}

/// Adds one endpoint, keeping the preferred copy of a duplicate.
fn merge(merged: &mut PortEndpoints, addr: BackendAddr, info: EndpointInfo) {
    match merged.entry(addr) {
        Entry::Vacant(vacant) => {
            vacant.insert(info);
        }
        Entry::Occupied(mut occupied) => {
            if info.rank() > occupied.get().rank() {
                occupied.insert(info);
            }
        }
    }
}

/// Splits a port's endpoints into slots (take new connections) and draining (keep existing
/// ones), as kube-proxy's `CategorizeEndpoints`: ready endpoints if any, else serving and
/// terminating ones; terminating endpoints left out of the slots drain. Both sorted.
fn select_backends(endpoints: &PortEndpoints) -> (Vec<Backend>, Vec<Backend>) {
    let any_ready = endpoints.values().any(|info| info.conditions.ready);
    let mut slots = Vec::new();
    let mut draining = Vec::new();
    for (&addr, info) in endpoints {
        let Conditions { ready, serving, terminating } = info.conditions;
        let backend = |state| Backend { addr, state, local: info.local };
        if any_ready && ready {
            slots.push(backend(BackendState::Active));
        } else if !any_ready && serving && terminating {
            slots.push(backend(BackendState::Terminating));
        } else if terminating {
            draining.push(backend(BackendState::Terminating));
        }
    }
    // Already sorted: `endpoints` is ordered by address and each address appears once.
    (slots, draining)
}

// ---------------------------------------------------------------------------------------------
// Desired state

/// One entry per frontend. Services are visited in `namespace/name` order, so when two claim the
/// same frontend, the first in that order keeps it and the other gets a problem.
fn build_desired(plans: &ServicePlans, endpoints: &EndpointMap, problems: &mut Vec<Problem>) -> Desired {
    let mut ordered: Vec<(String, &ObjectRef, &ServicePlan)> =
        plans.iter().filter_map(|(svc_ref, plan)| Some((svc_ref.to_string(), svc_ref, plan.as_ref()?))).collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));

    let mut desired = Desired::default();
    for (_, svc_ref, plan) in ordered {
        let per_port = endpoints.get(svc_ref).map(Vec::as_slice).unwrap_or_default();
        for (index, port) in plan.ports.iter().enumerate() {
            let (slots, draining) = per_port.get(index).map(select_backends).unwrap_or_default();
            let entry = ServiceEntry {
                service: svc_ref.clone(),
                port_name: port.name.clone(),
                flags: plan.flags,
                affinity_timeout: plan.affinity_timeout,
                slots,
                draining,
            };
            for &addr in &plan.addrs {
                let frontend = Frontend { addr, port: port.port, proto: port.proto };
                match desired.services.entry(frontend) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(entry.clone());
                    }
                    Entry::Occupied(occupied) => problems.push(problem(
                        SERVICE,
                        svc_ref,
                        format!("frontend {frontend} is already used by Service {}; ignored", occupied.get().service),
                    )),
                }
            }
        }
    }
    desired
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `namespace/name` of an object (namespace defaulted), `None` without a name.
fn object_ref(meta: &ObjectMeta) -> Option<ObjectRef> {
    let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
    Some(ObjectRef { namespace: namespace_of(meta).to_owned(), name: name.to_owned() })
}

/// The object's namespace, [`DEFAULT_NAMESPACE`] when unset.
#[must_use]
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(DEFAULT_NAMESPACE)
}

/// How a problem names an object without a name.
fn unnamed(meta: &ObjectMeta) -> String {
    format!("{}/(no name)", namespace_of(meta))
}

fn problem<O: ToString + ?Sized>(kind: &'static str, object: &O, reason: impl Into<String>) -> Problem {
    Problem { kind, object: object.to_string(), reason: reason.into() }
}

/// Parses an IP address like Kubernetes' `ParseIPSloppy`: IPv4 octets with leading zeros,
/// which old API objects may hold, are read as decimal.
fn parse_ip(raw: &str) -> Option<IpAddr> {
    if let Ok(ip) = raw.parse() {
        return Some(ip);
    }
    let mut octets = [0u8; 4];
    let mut parts = raw.split('.');
    for octet in &mut octets {
        let part = parts.next().filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(IpAddr::from(octets))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{ClientIPConfig, SessionAffinityConfig},
        discovery::v1::EndpointConditions,
    };

    use super::*;
    use BackendState::{Active, Terminating};
    use Protocol::{Tcp, Udp};

    const NODE: &str = "node-a";

    // --- builders -----------------------------------------------------------------------------

    /// `ns/name`, or `name` in the default namespace.
    fn meta(name: &str) -> ObjectMeta {
        let (namespace, name) = name.split_once('/').unwrap_or(("default", name));
        ObjectMeta { name: Some(name.to_owned()), namespace: Some(namespace.to_owned()), ..ObjectMeta::default() }
    }

    fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
        ServicePort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            port: number,
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        }
    }

    fn service(name: &str, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
        with_spec(Service { metadata: meta(name), ..Service::default() }, |spec| {
            spec.cluster_ip = Some(cluster_ip.to_owned());
            spec.ports = Some(ports);
        })
    }

    fn with_spec(mut svc: Service, edit: impl FnOnce(&mut ServiceSpec)) -> Service {
        edit(svc.spec.get_or_insert_with(ServiceSpec::default));
        svc
    }

    fn slice(name: &str, service: &str, ports: &[(&str, i32, &str)], endpoints: Vec<Endpoint>) -> EndpointSlice {
        let mut metadata = meta(name);
        metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into());
        EndpointSlice {
            metadata,
            address_type: "IPv4".to_owned(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .iter()
                    .map(|&(name, number, protocol)| EndpointPort {
                        name: Some(name.to_owned()),
                        port: Some(number),
                        protocol: Some(protocol.to_owned()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    /// An endpoint with unset conditions (ready).
    fn ep(addr: &str) -> Endpoint {
        Endpoint { addresses: vec![addr.to_owned()], ..Endpoint::default() }
    }

    fn ep_on(addr: &str, node: &str) -> Endpoint {
        Endpoint { node_name: Some(node.to_owned()), ..ep(addr) }
    }

    fn ep_cond(addr: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint { conditions: Some(EndpointConditions { ready, serving, terminating }), ..ep(addr) }
    }

    fn be(addr: &str, port: u16, proto: Protocol, state: BackendState) -> Backend {
        Backend { addr: BackendAddr { addr: addr.parse().unwrap(), port, proto }, state, local: false }
    }

    fn local(backend: Backend) -> Backend {
        Backend { local: true, ..backend }
    }

    fn fe(addr: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend { addr: addr.parse().unwrap(), port, proto }
    }

    fn objref(name: &str) -> ObjectRef {
        let (namespace, name) = name.split_once('/').unwrap();
        ObjectRef { namespace: namespace.to_owned(), name: name.to_owned() }
    }

    /// A plain cluster IP entry (no affinity, no traffic policy).
    fn entry(service: &str, port_name: &str, slots: Vec<Backend>, draining: Vec<Backend>) -> ServiceEntry {
        ServiceEntry {
            service: objref(service),
            port_name: port_name.to_owned(),
            flags: SVC_F_CLUSTER_IP,
            affinity_timeout: 0,
            slots,
            draining,
        }
    }

    fn desired(entries: Vec<(Frontend, ServiceEntry)>) -> Desired {
        Desired { services: entries.into_iter().collect(), ..Desired::default() }
    }

    fn prob(kind: &'static str, object: &str, reason: &str) -> Problem {
        problem(kind, object, reason)
    }

    fn run(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Translation {
        translate(&Objects { services, slices }, NODE)
    }

    // --- endpoints ----------------------------------------------------------------------------

    #[test]
    fn slices_of_a_service_are_merged_without_duplicates() {
        let out = run(
            vec![service("web", "10.96.0.10", vec![port("http", 80, "TCP")])],
            vec![
                slice(
                    "web-a",
                    "web",
                    &[("http", 8080, "TCP")],
                    vec![ep_on("10.0.0.2", "node-b"), ep_on("10.0.0.1", NODE)],
                ),
                slice("web-b", "web", &[("http", 8080, "TCP")], vec![ep_on("10.0.0.2", "node-b"), ep("10.0.0.3")]),
            ],
        );
        let slots = vec![
            local(be("10.0.0.1", 8080, Tcp, Active)),
            be("10.0.0.2", 8080, Tcp, Active),
            be("10.0.0.3", 8080, Tcp, Active),
        ];
        assert_eq!(out.problems, vec![]);
        assert_eq!(
            out.desired,
            desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "http", slots, vec![]))])
        );
    }

    /// (case, publishNotReadyAddresses, endpoints, expected slots, expected draining)
    type Case = (&'static str, bool, Vec<Endpoint>, Vec<Backend>, Vec<Backend>);

    #[test]
    fn endpoint_conditions_select_slots_and_draining() {
        let (t, f) = (Some(true), Some(false));
        let cases: Vec<Case> = vec![
            ("unset conditions are ready", false, vec![ep("10.0.0.1")], vec![be("10.0.0.1", 80, Tcp, Active)], vec![]),
            (
                "not-ready endpoints are excluded",
                false,
                vec![ep_cond("10.0.0.1", t, t, f), ep_cond("10.0.0.2", f, f, f), ep_cond("10.0.0.3", f, t, f)],
                vec![be("10.0.0.1", 80, Tcp, Active)],
                vec![],
            ),
            (
                "terminating endpoints drain while ready ones exist",
                false,
                vec![ep_cond("10.0.0.3", f, f, t), ep_cond("10.0.0.1", t, t, f), ep_cond("10.0.0.2", f, t, t)],
                vec![be("10.0.0.1", 80, Tcp, Active)],
                vec![be("10.0.0.2", 80, Tcp, Terminating), be("10.0.0.3", 80, Tcp, Terminating)],
            ),
            (
                "no ready endpoint: serving+terminating ones take new connections",
                false,
                vec![ep_cond("10.0.0.1", f, t, t), ep_cond("10.0.0.2", f, f, t), ep_cond("10.0.0.3", f, f, f)],
                vec![be("10.0.0.1", 80, Tcp, Terminating)],
                vec![be("10.0.0.2", 80, Tcp, Terminating)],
            ),
            ("nothing usable", false, vec![ep_cond("10.0.0.1", f, f, f)], vec![], vec![]),
            (
                "serving unset means true",
                false,
                vec![ep_cond("10.0.0.1", f, None, t)],
                vec![be("10.0.0.1", 80, Tcp, Terminating)],
                vec![],
            ),
            (
                "publishNotReadyAddresses: every endpoint is active",
                true,
                vec![ep_cond("10.0.0.1", f, f, f), ep_cond("10.0.0.2", f, t, t), ep("10.0.0.3")],
                vec![be("10.0.0.1", 80, Tcp, Active), be("10.0.0.2", 80, Tcp, Active), be("10.0.0.3", 80, Tcp, Active)],
                vec![],
            ),
            (
                "a duplicate keeps its most available copy",
                false,
                vec![ep_cond("10.0.0.1", f, t, t), ep_cond("10.0.0.1", t, t, f)],
                vec![be("10.0.0.1", 80, Tcp, Active)],
                vec![],
            ),
        ];
        for (case, publish, endpoints, slots, draining) in cases {
            let svc = with_spec(service("web", "10.96.0.10", vec![port("", 80, "TCP")]), |spec| {
                spec.publish_not_ready_addresses = Some(publish);
            });
            let out = run(vec![svc], vec![slice("web-a", "web", &[("", 80, "TCP")], endpoints)]);
            let expected = desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", slots, draining))]);
            assert_eq!(out.desired, expected, "{case}");
            assert_eq!(out.problems, vec![], "{case}");
        }
    }

    #[test]
    fn multiple_ports_and_the_same_port_on_tcp_and_udp() {
        let out = run(
            vec![service(
                "kube-system/dns",
                "10.96.0.10",
                vec![port("dns", 53, "UDP"), port("dns-tcp", 53, "TCP"), port("metrics", 9153, "TCP")],
            )],
            vec![slice(
                "kube-system/dns-x",
                "dns",
                &[("metrics", 9153, "TCP"), ("dns-tcp", 5353, "TCP"), ("dns", 5353, "UDP")],
                vec![ep("10.0.0.1")],
            )],
        );
        let expected = desired(vec![
            (
                fe("10.96.0.10", 53, Udp),
                entry("kube-system/dns", "dns", vec![be("10.0.0.1", 5353, Udp, Active)], vec![]),
            ),
            (
                fe("10.96.0.10", 53, Tcp),
                entry("kube-system/dns", "dns-tcp", vec![be("10.0.0.1", 5353, Tcp, Active)], vec![]),
            ),
            (
                fe("10.96.0.10", 9153, Tcp),
                entry("kube-system/dns", "metrics", vec![be("10.0.0.1", 9153, Tcp, Active)], vec![]),
            ),
        ]);
        assert_eq!(out.problems, vec![]);
        assert_eq!(out.desired, expected);
    }

    #[test]
    fn named_target_port_is_resolved_per_slice() {
        // During a rollout the same port name maps to different numbers in two slices; a slice
        // without the port (or with it under another protocol) contributes nothing.
        let out = run(
            vec![service("web", "10.96.0.10", vec![port("http", 80, "TCP")])],
            vec![
                slice("web-old", "web", &[("http", 8080, "TCP")], vec![ep("10.0.0.1")]),
                slice("web-new", "web", &[("http", 9090, "TCP")], vec![ep("10.0.0.2")]),
                slice("web-other", "web", &[("admin", 7000, "TCP"), ("http", 7001, "UDP")], vec![ep("10.0.0.3")]),
            ],
        );
        let slots = vec![be("10.0.0.1", 8080, Tcp, Active), be("10.0.0.2", 9090, Tcp, Active)];
        assert_eq!(out.problems, vec![]);
        assert_eq!(
            out.desired,
            desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "http", slots, vec![]))])
        );
    }

    #[test]
    fn unnamed_port_matches_unnamed_or_empty_slice_port() {
        let mut unnamed = slice("web-b", "web", &[("", 8081, "TCP")], vec![ep("10.0.0.2")]);
        if let Some(ports) = unnamed.ports.as_mut() {
            ports[0].name = None;
            ports[0].protocol = None; // TCP
        }
        let out = run(
            vec![with_spec(service("web", "10.96.0.10", vec![port("", 80, "TCP")]), |spec| {
                if let Some(ports) = spec.ports.as_mut() {
                    ports[0].protocol = None; // TCP
                }
            })],
            vec![slice("web-a", "web", &[("", 8080, "TCP")], vec![ep("10.0.0.1")]), unnamed],
        );
        let slots = vec![be("10.0.0.1", 8080, Tcp, Active), be("10.0.0.2", 8081, Tcp, Active)];
        assert_eq!(out.problems, vec![]);
        assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", slots, vec![]))]));
    }

    #[test]
    fn service_without_endpoints_still_has_its_frontend() {
        let out = run(vec![service("web", "10.96.0.10", vec![port("", 80, "TCP")])], vec![]);
        assert_eq!(out.problems, vec![]);
        assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", vec![], vec![]))]));
    }

    // --- services -----------------------------------------------------------------------------

    #[test]
    fn malformed_objects_are_reported_and_the_rest_translated() {
        let mut nameless = service("team/x", "10.96.0.3", vec![port("", 80, "TCP")]);
        nameless.metadata.name = None;
        let mut node_port = port("np", 82, "TCP");
        node_port.node_port = Some(70_000);
        let mut unlabeled = slice("orphan", "good", &[("", 80, "TCP")], vec![ep("10.0.0.9")]);
        unlabeled.metadata.labels = None;
        let services = vec![
            service("good", "10.96.0.1", vec![port("", 80, "TCP")]),
            service("bad-ip", "10.96.0.300", vec![port("", 80, "TCP")]),
            service(
                "ports",
                "10.96.0.2",
                vec![
                    port("zero", 0, "TCP"),
                    port("big", 70_000, "TCP"),
                    port("weird", 81, "FOO"),
                    node_port,
                    port("ok", 83, "TCP"),
                    port("dup", 83, "TCP"),
                ],
            ),
            nameless,
        ];
        let slices = vec![
            slice(
                "good-a",
                "good",
                &[("", 80, "TCP"), ("extra", 0, "TCP")],
                vec![ep("10.0.0.1"), ep("10.0.0.x"), Endpoint::default()],
            ),
            unlabeled,
            slice("ghost-a", "ghost", &[("", 80, "TCP")], vec![ep("10.0.0.8")]),
        ];
        let out = run(services, slices);
        let expected = desired(vec![
            (fe("10.96.0.1", 80, Tcp), entry("default/good", "", vec![be("10.0.0.1", 80, Tcp, Active)], vec![])),
            (fe("10.96.0.2", 83, Tcp), entry("default/ports", "ok", vec![], vec![])),
        ]);
        assert_eq!(out.desired, expected);
        let problems = vec![
            prob("EndpointSlice", "default/ghost-a", "no Service default/ghost for this slice"),
            prob("EndpointSlice", "default/good-a", "endpoint without address; ignored"),
            prob("EndpointSlice", "default/good-a", "invalid endpoint address \"10.0.0.x\""),
            prob("EndpointSlice", "default/good-a", "port \"extra\": invalid port number 0; ignored"),
            prob("EndpointSlice", "default/orphan", "missing label kubernetes.io/service-name"),
            prob("Service", "default/bad-ip", "invalid clusterIP \"10.96.0.300\""),
            prob("Service", "default/ports", "port 0/TCP: port 0 is out of range 1-65535"),
            prob("Service", "default/ports", "port 70000/TCP: port 70000 is out of range 1-65535"),
            prob("Service", "default/ports", "port 81/FOO: unknown protocol \"FOO\""),
            prob("Service", "default/ports", "port 82/TCP: nodePort 70000 is out of range 1-65535"),
            prob("Service", "default/ports", "port 83/TCP: duplicate of an earlier port; ignored"),
            prob("Service", "team/(no name)", "missing metadata.name"),
        ];
        assert_eq!(out.problems, problems);
    }

    #[test]
    fn external_name_headless_and_ip_less_services_are_ignored_silently() {
        let external = with_spec(service("ext", "", vec![port("", 80, "TCP")]), |spec| {
            spec.type_ = Some("ExternalName".to_owned());
            spec.cluster_ip = None;
            spec.external_name = Some("example.com".to_owned());
        });
        let headless = with_spec(service("headless", "None", vec![port("", 80, "TCP")]), |spec| {
            spec.cluster_ips = Some(vec!["None".to_owned()]);
        });
        let no_ip = with_spec(service("no-ip", "", vec![port("", 80, "TCP")]), |spec| spec.cluster_ip = None);
        let slices = ["ext", "headless", "no-ip"]
            .iter()
            .map(|name| slice(&format!("{name}-a"), name, &[("", 80, "TCP")], vec![ep("10.0.0.1")]))
            .collect();
        let out = run(vec![external, headless, no_ip], slices);
        assert_eq!(out, Translation::default());
    }

    #[test]
    fn service_types_and_sloppy_cluster_ip() {
        let node_port = with_spec(service("np", "10.96.0.1", vec![port("", 80, "TCP")]), |spec| {
            spec.type_ = Some("NodePort".to_owned());
        });
        let load_balancer = with_spec(service("lb", "010.096.000.002", vec![port("", 80, "TCP")]), |spec| {
            spec.type_ = Some("LoadBalancer".to_owned());
        });
        let out = run(vec![node_port, load_balancer], vec![]);
        let expected = desired(vec![
            (fe("10.96.0.1", 80, Tcp), entry("default/np", "", vec![], vec![])),
            (fe("10.96.0.2", 80, Tcp), entry("default/lb", "", vec![], vec![])),
        ]);
        assert_eq!(out.problems, vec![]);
        assert_eq!(out.desired, expected);
    }

    #[test]
    fn ipv6_is_refused_and_dual_stack_keeps_ipv4() {
        let dual = with_spec(service("dual", "10.96.0.5", vec![port("", 80, "TCP")]), |spec| {
            spec.cluster_ips = Some(vec!["10.96.0.5".to_owned(), "fd00::5".to_owned()]);
        });
        let v6_only = service("v6", "fd00::6", vec![port("", 80, "TCP")]);
        let mut v6_slice = slice("dual-v6", "dual", &[("", 80, "TCP")], vec![ep("fd00:1::1")]);
        v6_slice.address_type = "IPv6".to_owned();
        let mut fqdn_slice = slice("dual-fqdn", "dual", &[("", 80, "TCP")], vec![ep("example.com")]);
        fqdn_slice.address_type = "FQDN".to_owned();
        let v4_slice = slice("dual-v4", "dual", &[("", 80, "TCP")], vec![ep("10.0.0.1"), ep("fd00:1::2")]);
        let out = run(vec![dual, v6_only], vec![v6_slice, fqdn_slice, v4_slice]);
        let expected = desired(vec![(
            fe("10.96.0.5", 80, Tcp),
            entry("default/dual", "", vec![be("10.0.0.1", 80, Tcp, Active)], vec![]),
        )]);
        assert_eq!(out.desired, expected);
        let problems = vec![
            prob("EndpointSlice", "default/dual-v4", "endpoint fd00:1::2: IPv6 is not supported by the datapath yet"),
            prob("EndpointSlice", "default/dual-v6", "addressType IPv6: IPv6 is not supported by the datapath yet"),
            prob("Service", "default/dual", "clusterIP fd00::5: IPv6 is not supported by the datapath yet"),
            prob("Service", "default/v6", "clusterIP fd00::6: IPv6 is not supported by the datapath yet"),
        ];
        assert_eq!(out.problems, problems);
    }

    #[test]
    fn sctp_is_refused_for_its_port_only() {
        let out = run(
            vec![service("mixed", "10.96.0.7", vec![port("sig", 9000, "SCTP"), port("http", 80, "TCP")])],
            vec![slice("mixed-a", "mixed", &[("sig", 9000, "SCTP"), ("http", 8080, "TCP")], vec![ep("10.0.0.1")])],
        );
        let expected = desired(vec![(
            fe("10.96.0.7", 80, Tcp),
            entry("default/mixed", "http", vec![be("10.0.0.1", 8080, Tcp, Active)], vec![]),
        )]);
        assert_eq!(out.desired, expected);
        assert_eq!(
            out.problems,
            vec![prob("Service", "default/mixed", "port 9000/SCTP: SCTP is not supported by the datapath")]
        );
    }

    #[test]
    fn frontend_conflict_goes_to_the_first_namespace_name() {
        let out = run(
            vec![
                service("b/api", "10.96.0.9", vec![port("", 80, "TCP"), port("alt", 81, "TCP")]),
                service("a/api", "10.96.0.9", vec![port("", 80, "TCP")]),
            ],
            vec![],
        );
        let expected = desired(vec![
            (fe("10.96.0.9", 80, Tcp), entry("a/api", "", vec![], vec![])),
            (fe("10.96.0.9", 81, Tcp), entry("b/api", "alt", vec![], vec![])),
        ]);
        assert_eq!(out.desired, expected);
        let reason = "frontend 10.96.0.9:80/TCP is already used by Service a/api; ignored";
        assert_eq!(out.problems, vec![prob("Service", "b/api", reason)]);
    }

    #[test]
    fn duplicate_definitions_of_one_service() {
        let svc = service("web", "10.96.0.10", vec![port("", 80, "TCP")]);
        let out = run(vec![svc.clone(), svc.clone()], vec![]);
        assert_eq!(out.problems, vec![]);
        assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", vec![], vec![]))]));

        let other = service("web", "10.96.0.11", vec![port("", 80, "TCP")]);
        let out = run(vec![svc, other], vec![slice("web-a", "web", &[("", 80, "TCP")], vec![ep("10.0.0.1")])]);
        assert_eq!(out.desired, Desired::default());
        let reason = "defined more than once with different content; all definitions ignored";
        assert_eq!(out.problems, vec![prob("Service", "default/web", reason)]);
    }

    #[test]
    fn affinity_and_traffic_policy_flags() {
        let client_ip = |timeout: Option<i32>| {
            move |spec: &mut ServiceSpec| {
                spec.session_affinity = Some("ClientIP".to_owned());
                spec.session_affinity_config = timeout.map(|timeout_seconds| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig { timeout_seconds: Some(timeout_seconds) }),
                });
            }
        };
        let services = vec![
            with_spec(service("default-timeout", "10.96.0.1", vec![port("", 80, "TCP")]), client_ip(None)),
            with_spec(service("short", "10.96.0.2", vec![port("", 80, "TCP")]), client_ip(Some(60))),
            with_spec(service("bad-timeout", "10.96.0.3", vec![port("", 80, "TCP")]), client_ip(Some(0))),
            with_spec(service("local", "10.96.0.4", vec![port("", 80, "TCP")]), |spec| {
                spec.internal_traffic_policy = Some("Local".to_owned());
            }),
        ];
        let out = run(services, vec![]);
        let with_flags = |name: &str, flags: u16, affinity_timeout: u32| ServiceEntry {
            flags,
            affinity_timeout,
            ..entry(name, "", vec![], vec![])
        };
        let affinity = SVC_F_CLUSTER_IP | SVC_F_AFFINITY;
        let expected = desired(vec![
            (fe("10.96.0.1", 80, Tcp), with_flags("default/default-timeout", affinity, DEFAULT_AFFINITY_TIMEOUT)),
            (fe("10.96.0.2", 80, Tcp), with_flags("default/short", affinity, 60)),
            (fe("10.96.0.3", 80, Tcp), with_flags("default/bad-timeout", affinity, DEFAULT_AFFINITY_TIMEOUT)),
            (fe("10.96.0.4", 80, Tcp), with_flags("default/local", SVC_F_CLUSTER_IP | SVC_F_ITP_LOCAL, 0)),
        ]);
        assert_eq!(out.desired, expected);
        let reason = "sessionAffinityConfig.clientIP.timeoutSeconds 0 is out of range 1-86400; using 10800";
        assert_eq!(out.problems, vec![prob("Service", "default/bad-timeout", reason)]);
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let (t, f) = (Some(true), Some(false));
        let services = vec![
            service("web", "10.96.0.10", vec![port("http", 80, "TCP"), port("dns", 53, "UDP")]),
            service("b/api", "10.96.0.9", vec![port("", 80, "TCP")]),
            service("a/api", "10.96.0.9", vec![port("", 80, "TCP")]),
            service("bad", "nope", vec![port("", 80, "TCP")]),
        ];
        let slices = vec![
            slice(
                "web-a",
                "web",
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                vec![ep_on("10.0.0.1", NODE), ep_cond("10.0.0.2", f, t, t), ep_cond("10.0.0.3", f, f, t)],
            ),
            slice("web-b", "web", &[("http", 9090, "TCP")], vec![ep_cond("10.0.0.2", t, t, f), ep("10.0.0.4")]),
            slice("a/api-a", "api", &[("", 80, "TCP")], vec![ep("10.0.1.1"), ep("10.0.1.2")]),
            slice("ghost-a", "ghost", &[("", 80, "TCP")], vec![ep("10.0.0.5")]),
        ];
        let reference = run(services.clone(), slices.clone());
        assert!(!reference.desired.services.is_empty());
        for rotation in 0..services.len() {
            let mut services = services.clone();
            let mut slices = slices.clone();
            services.rotate_left(rotation);
            slices.reverse();
            let shift = rotation % slices.len();
            slices.rotate_left(shift);
            for slice in &mut slices {
                if let Some(endpoints) = slice.endpoints.as_mut() {
                    endpoints.reverse();
                }
            }
            assert_eq!(run(services, slices), reference, "rotation {rotation}");
        }
    }

    #[test]
    fn sloppy_ip_parsing() {
        assert_eq!(parse_ip("10.96.0.1"), Some(IpAddr::from([10, 96, 0, 1])));
        assert_eq!(parse_ip("010.096.000.001"), Some(IpAddr::from([10, 96, 0, 1])));
        assert_eq!(parse_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
        for bad in ["", "10.96.0", "10.96.0.1.2", "10.96.0.256", "10.96.+1.1", "10..0.1", "None"] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
    }
}

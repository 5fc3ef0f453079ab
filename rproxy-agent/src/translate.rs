//! Pure translation: Kubernetes Services and `EndpointSlices` → [`Desired`] map state, plus the
//! [`Problem`]s found on the way. No I/O; the same objects in any order give the same result.
//!
//! IPv4 and IPv6, each family on its own as kube-proxy's per-family proxiers; TCP and UDP. The
//! rules follow kube-proxy (`pkg/proxy`: `serviceport.go` for
//! frontends, `endpointslicecache.go` for slices, `topology.go` for endpoint categorization,
//! `iptables/proxier.go` for which endpoints each kind of traffic uses).
//!
//! Frontends, for each valid port of a Service of type `ClusterIP` (the default), `NodePort` or
//! `LoadBalancer` that has a cluster IP (`ExternalName` and headless Services have none):
//! - each cluster IP (`clusterIPs`, else `clusterIP`; a dual-stack Service has one per family):
//!   [`SVC_F_CLUSTER_IP`], plus [`SVC_F_ITP_LOCAL`] with `internalTrafficPolicy: Local`;
//! - each `externalIPs` entry: [`SVC_F_EXTERNAL_IP`];
//! - for `LoadBalancer` Services, each `status.loadBalancer.ingress[].ip` whose `ipMode`
//!   is `VIP` or unset: [`SVC_F_LOAD_BALANCER`]. `Proxy` ingress IPs are left to the load
//!   balancer (kube-proxy does not short-circuit them); hostname-only ingress is ignored;
//! - for `NodePort` and `LoadBalancer` Services, the port's `nodePort` when set (not with
//!   `allocateLoadBalancerNodePorts: false`), on each of the node's addresses
//!   ([`NodeContext::addresses`], `nodeIP:nodePort`): [`SVC_F_NODE_PORT`]. A node without
//!   addresses gets no `NodePort` frontend. A node address that is also another Service's address
//!   (with the same port) is a frontend conflict like any other.
//!
//! The last three kinds are external frontends: they get [`SVC_F_ETP_LOCAL`] with
//! `externalTrafficPolicy: Local`. Ingress IPs of a Service with `loadBalancerSourceRanges` get
//! [`SVC_F_SOURCE_RANGE`] and the ranges ([`ServiceEntry::source_ranges`]), as kube-proxy's
//! firewall applies them to its load balancer IPs only (not to node ports or externalIPs). Every frontend gets [`SVC_F_AFFINITY`] and the timeout with
//! `sessionAffinity: ClientIP`. When two Services claim one frontend, the first in
//! `namespace/name` order keeps it and the other gets a problem.
//!
//! Endpoints:
//! - slices belong to the Service named by their `kubernetes.io/service-name` label in their
//!   namespace; the slices of one Service are merged and duplicate endpoints removed;
//! - a frontend gets the endpoints of its family only (slices of `addressType` `IPv4` or
//!   `IPv6`; FQDN slices are ignored), and everything below is decided per family;
//! - a service port takes its backend port from the slice port with the same name and protocol
//!   (the endpoints controller has already resolved named `targetPort`s into the slices);
//! - per service port, as kube-proxy's `CategorizeEndpoints`: the *cluster* endpoints are the
//!   ready ones, or if none is ready the serving+terminating ones; the *local* endpoints are,
//!   independently, the local ready ones, or if none the local serving+terminating ones;
//! - topology hints, which the `EndpointSlice` controller sets for `trafficDistribution:
//!   PreferClose` / `PreferSameZone` / `PreferSameNode` and the `service.kubernetes.io/topology-mode:
//!   Auto` annotation, narrow the ready cluster endpoints as kube-proxy's `topologyModeFromHints`
//!   does: if every ready endpoint has node hints and one names this node, only those; else if
//!   every ready endpoint has zone hints and one names this node's zone
//!   ([`NodeContext::zone`]), only those; else all. The ready endpoints so left out keep their
//!   established connections ([`ServiceEntry::draining`]);
//! - a cluster IP frontend's [`ServiceEntry::slots`] are the local endpoints with
//!   `internalTrafficPolicy: Local`, else the cluster endpoints; without a local one while the
//!   Service has endpoints elsewhere it gets [`SVC_F_NO_LOCAL_ENDPOINTS`]: its new flows are
//!   dropped, not rejected, as kube-proxy's "has no local endpoints" rule drops them;
//! - an external frontend's slots (what pods use) are always the cluster endpoints: kube-proxy
//!   sends pod → external destination traffic to the cluster policy chain whatever the policies
//!   (its `EXT-` chain jumps there for pod sources when `externalTrafficPolicy` is `Local`, and
//!   the external policy chain is the cluster one otherwise; `internalTrafficPolicy` applies to
//!   cluster IPs only). With `externalTrafficPolicy: Local`, [`ServiceEntry::local_slots`]
//!   holds the local endpoints, for traffic from outside the cluster;
//! - terminating endpoints not in the slots drain ([`ServiceEntry::draining`]).
//!
//! Health checks: a `LoadBalancer` Service with `externalTrafficPolicy: Local` (the only ones
//! kube-proxy serves a health check for) and a `healthCheckNodePort` gets a [`HealthCheck`]
//! whose count is kube-proxy's (`EndpointsMap.LocalReadyEndpoints`): distinct addresses of ready
//! local endpoints over the Service's ports, of its primary family (the first of `ipFamilies`). Ports refused here (SCTP) do not count.
//!
//! A bad object (or the bad part of one) is skipped with a [`Problem`]; everything else is still
//! translated. Nothing here panics on user data.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use rproxy_common::{
    SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL_IP, SVC_F_ITP_LOCAL, SVC_F_LOAD_BALANCER,
    SVC_F_NO_LOCAL_ENDPOINTS, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE,
};
use tracing::debug;

use crate::model::{
    Backend, BackendAddr, BackendState, Desired, Family, Frontend, HealthCheck, NodeContext, ObjectRef, Problem,
    Protocol, ServiceEntry,
};

/// Label that ties an `EndpointSlice` to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label of Services (and their `EndpointSlices`) that another service proxy handles; kube-proxy
/// ignores objects that carry it, and so does rproxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the `EndpointSlice` controller puts on the `EndpointSlices` of headless Services (and a
/// Service may carry it too): no virtual IP to translate.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The label that hides an object from every kube-proxy (present with any value), if it carries
/// one: [`SERVICE_PROXY_NAME_LABEL`] or [`HEADLESS_LABEL`]. The API source also asks the server
/// to leave such objects out; every source applies the rule itself through the store.
#[must_use]
pub fn hiding_label(meta: &ObjectMeta) -> Option<&'static str> {
    let labels = meta.labels.as_ref()?;
    [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL].into_iter().find(|l| labels.contains_key(*l))
}

/// Namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// `ClientIP` affinity timeout when the Service sets none (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest `ClientIP` affinity timeout Kubernetes accepts (one day).
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;
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

/// Result of [`translate`] and [`translate_refs`]: the desired map state and what was skipped,
/// and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    /// Sorted (by kind, object, reason) and without duplicates.
    pub problems: Vec<Problem>,
}

/// Translates Services and `EndpointSlices` into the desired state of the maps. `node` is this
/// node: its name sets [`Backend::local`], its addresses carry the `NodePort` frontends.
#[must_use]
pub fn translate(objects: &Objects, node: &NodeContext) -> Translation {
    let services: Vec<&Service> = objects.services.iter().collect();
    let slices: Vec<&EndpointSlice> = objects.slices.iter().collect();
    translate_refs(&services, &slices, node)
}

/// [`translate`] over borrowed objects, so that a caller can translate a subset (one Service with
/// its slices, say) without cloning; the slices may be API objects or the store's compact forms
/// ([`SliceInput`]). A slice whose Service is not among `services` is reported.
#[must_use]
pub fn translate_refs<S: SliceInput + ?Sized>(services: &[&Service], slices: &[&S], node: &NodeContext) -> Translation {
    let mut problems = Vec::new();
    let plans = plan_services(services, &mut problems);
    let endpoints = collect_endpoints(slices, &plans, node, &mut problems);
    let desired = build_desired(&plans, &endpoints, &node.addresses, &mut problems);
    problems.sort_by(|a, b| (a.kind, &a.object, &a.reason).cmp(&(b.kind, &b.object, &b.reason)));
    problems.dedup();
    Translation { desired, problems }
}

// ---------------------------------------------------------------------------------------------
// Services

/// What a valid Service contributes: for each port, a frontend per address (of each kind) and
/// its `nodePort` frontends.
#[derive(Debug)]
struct ServicePlan {
    /// Addresses of either family, each list sorted, without duplicates.
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    /// VIP-mode ingress IPs (`LoadBalancer` Services only).
    load_balancer_ips: Vec<IpAddr>,
    /// Valid ports, in spec order, unique by (port, protocol).
    ports: Vec<PortPlan>,
    itp_local: bool,
    etp_local: bool,
    /// `Some(timeout)` with `ClientIP` affinity.
    affinity_timeout: Option<u32>,
    publish_not_ready: bool,
    health_check_node_port: Option<u16>,
    /// `LoadBalancer` Services with `loadBalancerSourceRanges`: the valid ones of both families
    /// (see [`source_ranges`]).
    source_ranges: Option<Vec<IpNet>>,
    /// The family whose endpoints the health check counts: the first of `ipFamilies`, else
    /// that of the first cluster IP.
    primary: Family,
}

/// One valid service port.
#[derive(Debug)]
struct PortPlan {
    /// "" when unnamed.
    name: String,
    port: u16,
    proto: Protocol,
    /// Set only for `NodePort` and `LoadBalancer` Services.
    node_port: Option<u16>,
}

/// The kinds of frontend, in the order a Service claims them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl ServicePlan {
    /// The frontends of one port, cluster IPs first, then external IPs, ingress IPs, and the
    /// node port on each node address.
    fn frontends(&self, port: &PortPlan, node_addresses: &[IpAddr]) -> Vec<(FrontendKind, Frontend)> {
        let mut frontends = Vec::new();
        let mut add = |kind, addrs: &[IpAddr], number| {
            frontends.extend(addrs.iter().map(|&addr| (kind, Frontend { addr, port: number, proto: port.proto })));
        };
        add(FrontendKind::ClusterIp, &self.cluster_ips, port.port);
        add(FrontendKind::ExternalIp, &self.external_ips, port.port);
        add(FrontendKind::LoadBalancer, &self.load_balancer_ips, port.port);
        if let Some(node_port) = port.node_port {
            add(FrontendKind::NodePort, node_addresses, node_port);
        }
        frontends
    }

    /// `SVC_F_*` bits of a frontend of this kind.
    fn flags(&self, kind: FrontendKind) -> u16 {
        let mut flags = match kind {
            FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
            FrontendKind::ExternalIp => SVC_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
            FrontendKind::NodePort => SVC_F_NODE_PORT,
        };
        if kind == FrontendKind::ClusterIp && self.itp_local {
            flags |= SVC_F_ITP_LOCAL;
        }
        if kind != FrontendKind::ClusterIp && self.etp_local {
            flags |= SVC_F_ETP_LOCAL;
        }
        if self.affinity_timeout.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        if kind == FrontendKind::LoadBalancer && self.source_ranges.is_some() {
            flags |= SVC_F_SOURCE_RANGE;
        }
        flags
    }
}

/// The Service types that produce frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Every Service that has a name: `Some` plan if it produces frontends, `None` if it exists but
/// is ignored (headless, `ExternalName`…) or rejected. Slices of a `None` Service are unused
/// without a problem.
type ServicePlans = BTreeMap<ObjectRef, Option<ServicePlan>>;

fn plan_services(services: &[&Service], problems: &mut Vec<Problem>) -> ServicePlans {
    let mut by_ref: BTreeMap<ObjectRef, Vec<&Service>> = BTreeMap::new();
    for &svc in services {
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
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => {
            debug!(service = %svc_ref, "ignoring ExternalName Service");
            return None;
        }
        Some(other) => {
            report(format!("unknown type {other:?}"));
            return None;
        }
    };
    let raw_ips = cluster_ips(spec);
    if raw_ips.is_empty() {
        debug!(service = %svc_ref, "ignoring Service without clusterIP");
        return None;
    }
    if raw_ips.contains(&"None") {
        debug!(service = %svc_ref, "ignoring headless Service");
        return None;
    }
    let cluster_ips = parse_addrs("clusterIP", raw_ips, &mut report);
    let external_ips = parse_addrs("externalIP", spec.external_ips.iter().flatten().map(String::as_str), &mut report);
    let load_balancer_ips = load_balancer_ips(svc_ref, svc, service_type, &mut report);
    let has_node_ports = matches!(service_type, ServiceType::NodePort | ServiceType::LoadBalancer);
    let ports = plan_ports(spec.ports.as_deref().unwrap_or_default(), has_node_ports, &mut report);
    let policies = Policies::of(spec, &mut report);
    let health_check_node_port = health_check_node_port(spec, service_type, policies.etp_local, &mut report);
    let source_ranges = source_ranges(spec, service_type, &load_balancer_ips, &mut report);
    let primary = match spec.ip_families.as_deref().and_then(<[String]>::first).map(String::as_str) {
        Some("IPv6") => Family::V6,
        Some(_) => Family::V4,
        None => cluster_ips.first().map_or(Family::V4, |ip| Family::of(*ip)),
    };
    Some(ServicePlan {
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        itp_local: policies.itp_local,
        etp_local: policies.etp_local,
        affinity_timeout: policies.affinity_timeout,
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        health_check_node_port,
        source_ranges,
        primary,
    })
}

/// `loadBalancerSourceRanges` of a `LoadBalancer` Service, as kube-proxy's firewall reads them:
/// `None` when there are none (every source may connect); else the valid CIDRs of both families,
/// host bits cleared, sorted and deduplicated (each ingress IP is checked against those of its
/// family); unparsable ones are reported. Fail closed: an ingress IP of a family the ranges do
/// not cover takes no new flow at all (kube-proxy's per-family proxier would leave it open to
/// every source), and that is reported.
fn source_ranges(
    spec: &ServiceSpec,
    service_type: ServiceType,
    ingress_ips: &[IpAddr],
    report: &mut impl FnMut(String),
) -> Option<Vec<IpNet>> {
    let raw = spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
    if raw.is_empty() {
        return None;
    }
    if service_type != ServiceType::LoadBalancer {
        report(String::from("loadBalancerSourceRanges on a Service that is not a LoadBalancer; ignored"));
        return None;
    }
    let mut nets = BTreeSet::new();
    for cidr in raw {
        match cidr.trim().parse::<IpNet>() {
            Ok(net) => {
                nets.insert(net.trunc());
            }
            Err(e) => report(format!("loadBalancerSourceRanges entry {cidr:?}: {e}; skipped")),
        }
    }
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let has_ingress = ingress_ips.iter().any(|ip| ip.is_ipv6() == v6);
        if has_ingress && !nets.iter().any(|net| matches!(net, IpNet::V6(_)) == v6) {
            report(format!(
                "loadBalancerSourceRanges holds no valid {family} range: the {family} ingress IPs take no connection"
            ));
        }
    }
    Some(nets.into_iter().collect())
}

/// `spec.clusterIPs`, or `spec.clusterIP` when that is empty; empty strings dropped.
fn cluster_ips(spec: &ServiceSpec) -> Vec<&str> {
    let ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    ips.into_iter().filter(|ip| !ip.is_empty()).collect()
}

/// Keeps the addresses of either family (sorted, deduplicated); reports unparsable and
/// unspecified ones. `field` names them in problems.
fn parse_addrs<'a>(
    field: &str,
    raw_addrs: impl IntoIterator<Item = &'a str>,
    report: &mut impl FnMut(String),
) -> Vec<IpAddr> {
    let mut addrs = BTreeSet::new();
    for raw in raw_addrs {
        match parse_ip(raw) {
            Some(addr) if addr.is_unspecified() => {
                report(format!("{field} {raw}: the unspecified address cannot be a Service address"));
            }
            Some(addr) => {
                addrs.insert(addr);
            }
            None => report(format!("invalid {field} {raw:?}")),
        }
    }
    addrs.into_iter().collect()
}

/// The VIP-mode ingress IPs of a `LoadBalancer` Service's status, as kube-proxy programs them:
/// `ipMode` `VIP` or unset. `Proxy` ones are skipped (the load balancer proxies to the nodes, so
/// the ingress IP never reaches them as a destination); an unknown mode is reported and read as
/// VIP. Hostname-only ingress is ignored.
fn load_balancer_ips(
    svc_ref: &ObjectRef,
    svc: &Service,
    service_type: ServiceType,
    report: &mut impl FnMut(String),
) -> Vec<IpAddr> {
    let ingress = svc.status.as_ref().and_then(|status| status.load_balancer.as_ref()?.ingress.as_deref());
    let ingress = ingress.unwrap_or_default();
    if service_type != ServiceType::LoadBalancer {
        if !ingress.is_empty() {
            debug!(service = %svc_ref, "ignoring status.loadBalancer of a Service that is not a LoadBalancer");
        }
        return Vec::new();
    }
    let mut raw_ips = Vec::new();
    for entry in ingress {
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            debug!(service = %svc_ref, hostname = ?entry.hostname, "ignoring load balancer ingress without ip");
            continue;
        };
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => {
                debug!(service = %svc_ref, ip, "ignoring load balancer ingress with ipMode Proxy");
                continue;
            }
            Some(other) => report(format!("loadBalancer ingress {ip}: unknown ipMode {other:?}; using VIP")),
        }
        raw_ips.push(ip);
    }
    parse_addrs("loadBalancer ingress IP", raw_ips, report)
}

/// Keeps the valid ports, unique by (port, protocol); reports the others. `has_node_ports`:
/// the Service type has node ports (`NodePort`, `LoadBalancer`).
fn plan_ports(ports: &[ServicePort], has_node_ports: bool, report: &mut impl FnMut(String)) -> Vec<PortPlan> {
    let mut seen = BTreeSet::new();
    let mut plans = Vec::new();
    for port in ports {
        let label = format!("port {}/{}", port.port, port.protocol.as_deref().unwrap_or("TCP"));
        match plan_port(port, has_node_ports, &label, report) {
            Ok(plan) if seen.insert((plan.port, plan.proto)) => plans.push(plan),
            Ok(_) => report(format!("{label}: duplicate of an earlier port; ignored")),
            Err(reason) => report(format!("{label}: {reason}")),
        }
    }
    plans
}

fn plan_port(
    port: &ServicePort,
    has_node_ports: bool,
    label: &str,
    report: &mut impl FnMut(String),
) -> Result<PortPlan, String> {
    let proto = parse_protocol(port.protocol.as_deref())?;
    let number = valid_port(port.port).ok_or_else(|| format!("port {} is out of range 1-65535", port.port))?;
    // nodePort 0 means "not set", as in the Kubernetes API (`allocateLoadBalancerNodePorts:
    // false`, say).
    let mut node_port = None;
    if let Some(raw) = port.node_port.filter(|&n| n != 0) {
        let valid = valid_port(raw).ok_or_else(|| format!("nodePort {raw} is out of range 1-65535"))?;
        if has_node_ports {
            node_port = Some(valid);
        } else {
            report(format!("{label}: nodePort {raw} is only used by NodePort and LoadBalancer Services; ignored"));
        }
    }
    Ok(PortPlan { name: port.name.clone().unwrap_or_default(), port: number, proto, node_port })
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

/// Traffic policies and session affinity. Unknown values are reported and read as the
/// Kubernetes default.
struct Policies {
    itp_local: bool,
    etp_local: bool,
    affinity_timeout: Option<u32>,
}

impl Policies {
    fn of(spec: &ServiceSpec, report: &mut impl FnMut(String)) -> Self {
        let affinity_timeout = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => Some(affinity_timeout_of(spec, report)),
            Some(other) => {
                report(format!("unknown sessionAffinity {other:?}; using None"));
                None
            }
        };
        let itp_local = is_local_policy("internalTrafficPolicy", spec.internal_traffic_policy.as_deref(), report);
        let etp_local = is_local_policy("externalTrafficPolicy", spec.external_traffic_policy.as_deref(), report);
        Self { itp_local, etp_local, affinity_timeout }
    }
}

/// A traffic policy: `Local`, or `Cluster` (also when unset or unknown, reported).
fn is_local_policy(field: &str, value: Option<&str>, report: &mut impl FnMut(String)) -> bool {
    match value {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            report(format!("unknown {field} {other:?}; using Cluster"));
            false
        }
    }
}

/// The health check node port kube-proxy serves: only for `LoadBalancer` Services with
/// `externalTrafficPolicy: Local` (`apiservice.NeedsHealthCheck`). A missing one is reported, as
/// is one set on any other Service (the API server refuses both).
fn health_check_node_port(
    spec: &ServiceSpec,
    service_type: ServiceType,
    etp_local: bool,
    report: &mut impl FnMut(String),
) -> Option<u16> {
    let needed = service_type == ServiceType::LoadBalancer && etp_local;
    match spec.health_check_node_port.filter(|&port| port != 0) {
        None if needed => {
            report(
                "no healthCheckNodePort for a LoadBalancer with externalTrafficPolicy Local; no health check served"
                    .to_owned(),
            );
            None
        }
        None => None,
        Some(port) if !needed => {
            report(format!(
                "healthCheckNodePort {port} is only used by LoadBalancer Services with externalTrafficPolicy Local; ignored"
            ));
            None
        }
        Some(port) => {
            let valid = valid_port(port);
            if valid.is_none() {
                report(format!("healthCheckNodePort {port} is out of range 1-65535"));
            }
            valid
        }
    }
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
    fn of(endpoint: &EndpointFields<'_>, publish_not_ready: bool) -> Self {
        Self {
            ready: publish_not_ready || endpoint.ready.unwrap_or(true),
            serving: endpoint.serving.unwrap_or(true),
            terminating: endpoint.terminating.unwrap_or(false),
        }
    }
}

/// One usable endpoint address of a slice.
#[derive(Clone, Copy, Debug)]
struct EndpointInfo {
    addr: IpAddr,
    conditions: Conditions,
    local: bool,
    hints: Hints,
}

/// An endpoint's topology hints, as they concern this node.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints {
    /// `None` without zone hints; else whether one names this node's zone.
    pub zone: Option<bool>,
    /// `None` without node hints; else whether one names this node.
    pub node: Option<bool>,
}

impl Hints {
    fn of(endpoint: &Endpoint, node: &NodeContext) -> Self {
        let Some(hints) = &endpoint.hints else { return Self::default() };
        let zone = node.zone.as_deref().unwrap_or_default();
        let zones = hints.for_zones.as_deref().unwrap_or_default();
        let nodes = hints.for_nodes.as_deref().unwrap_or_default();
        Self {
            zone: (!zones.is_empty()).then(|| zones.iter().any(|z| z.name == zone)),
            node: (!nodes.is_empty()).then(|| nodes.iter().any(|n| n.name == node.name)),
        }
    }
}

/// Which ready endpoints the cluster endpoints are narrowed to (kube-proxy's
/// `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    All,
    /// Those whose node hints name this node.
    SameNode,
    /// Those whose zone hints name this node's zone.
    SameZone,
}

impl Topology {
    /// Node hints first, then zone hints; each kind only if every ready endpoint has hints of
    /// that kind and at least one names this node (its zone). Endpoints that are not ready are
    /// not looked at.
    fn of(endpoints: &PortEndpoints) -> Self {
        let ready = || endpoints.values().filter(|info| info.conditions.ready).map(|info| info.hints);
        let narrows = |kind: fn(Hints) -> Option<bool>| {
            ready().all(|h| kind(h).is_some()) && ready().any(|h| kind(h) == Some(true))
        };
        if narrows(|h| h.node) {
            Self::SameNode
        } else if narrows(|h| h.zone) {
            Self::SameZone
        } else {
            Self::All
        }
    }

    fn admits(self, info: &EndpointInfo) -> bool {
        match self {
            Self::All => true,
            Self::SameNode => info.hints.node == Some(true),
            Self::SameZone => info.hints.zone == Some(true),
        }
    }
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

/// An `EndpointSlice` as the translation reads it: the API object, or the store's compact form
/// of one (`source::slim::CompactSlice`), read without rebuilding the object.
pub trait SliceInput {
    /// The slice's namespace and name; `Err` without a name: how a problem names it.
    fn slice_ref(&self) -> Result<ObjectRef, String>;
    /// Its [`SERVICE_NAME_LABEL`].
    fn service_name(&self) -> Option<&str>;
    fn address_type(&self) -> &str;
    fn ports(&self) -> &[EndpointPort];
    /// Its endpoints, as they concern `node`.
    fn endpoints(&self, node: &NodeContext) -> impl Iterator<Item = EndpointFields<'_>>;
}

/// One endpoint of a slice, as the translation reads it.
pub struct EndpointFields<'a> {
    /// The first address (kube-proxy's choice), as written or already parsed; `None`: none.
    pub address: Option<Address<'a>>,
    /// The conditions as written (`None`: unset).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Whether its `nodeName` is this node ([`is_local`]).
    pub local: bool,
    pub hints: Hints,
}

/// An endpoint's address.
pub enum Address<'a> {
    Text(&'a str),
    Parsed(IpAddr),
}

impl SliceInput for EndpointSlice {
    fn slice_ref(&self) -> Result<ObjectRef, String> {
        object_ref(&self.metadata).ok_or_else(|| unnamed(&self.metadata))
    }

    fn service_name(&self) -> Option<&str> {
        self.metadata.labels.as_ref().and_then(|labels| labels.get(SERVICE_NAME_LABEL)).map(String::as_str)
    }

    fn address_type(&self) -> &str {
        &self.address_type
    }

    fn ports(&self) -> &[EndpointPort] {
        self.ports.as_deref().unwrap_or_default()
    }

    fn endpoints(&self, node: &NodeContext) -> impl Iterator<Item = EndpointFields<'_>> {
        self.endpoints.iter().flatten().map(|e| {
            let conditions = e.conditions.as_ref();
            EndpointFields {
                address: e.addresses.first().map(|a| Address::Text(a)),
                ready: conditions.and_then(|c| c.ready),
                serving: conditions.and_then(|c| c.serving),
                terminating: conditions.and_then(|c| c.terminating),
                local: is_local(e.node_name.as_deref(), &node.name),
                hints: Hints::of(e, node),
            }
        })
    }
}

fn collect_endpoints<S: SliceInput + ?Sized>(
    slices: &[&S],
    plans: &ServicePlans,
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> EndpointMap {
    let mut endpoints = EndpointMap::new();
    for &slice in slices {
        let slice_ref = match slice.slice_ref() {
            Ok(r) => r,
            Err(unnamed) => {
                problems.push(problem(SLICE, &unnamed, "missing metadata.name"));
                continue;
            }
        };
        let (svc_ref, plan) = match owning_service(slice.service_name(), &slice_ref, plans) {
            Ok(Some(owner)) => owner,
            Ok(None) => continue,
            Err((reason, transient)) => {
                problems.push(Problem { transient, ..problem(SLICE, &slice_ref, reason) });
                continue;
            }
        };
        let mut report = |reason: String| problems.push(problem(SLICE, &slice_ref, reason));
        let Some(v6) = slice_family(slice.address_type(), &slice_ref, &mut report) else {
            continue;
        };
        let infos = slice_endpoints(slice, v6, plan.publish_not_ready, node, &mut report);
        let slice_ports = slice_ports(slice.ports(), &mut report);
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

/// The Service a slice belongs to, if it produces frontends (`None`: its Service has none). An
/// error for a slice without the service-name label, or whose Service does not exist: the
/// reason, and whether it is transient ([`Problem::transient`]).
fn owning_service<'p>(
    label: Option<&str>,
    slice_ref: &ObjectRef,
    plans: &'p ServicePlans,
) -> Result<Option<(ObjectRef, &'p ServicePlan)>, (String, bool)> {
    let Some(name) = label.filter(|name| !name.is_empty()) else {
        return Err((format!("missing label {SERVICE_NAME_LABEL}"), false));
    };
    let svc_ref = ObjectRef { namespace: slice_ref.namespace.clone(), name: name.into() };
    match plans.get(&svc_ref) {
        // The slice came before its Service, or its Service was deleted and the garbage
        // collector has not removed the slice yet.
        None => Err((format!("no Service {svc_ref} for this slice"), true)),
        Some(None) => {
            debug!(slice = %slice_ref, service = %svc_ref, "slice unused: its Service has no frontend");
            Ok(None)
        }
        Some(Some(plan)) => Ok(Some((svc_ref, plan))),
    }
}

/// The slice's family (`Some(true)` for IPv6); FQDN slices are ignored, unknown types reported.
fn slice_family(address_type: &str, slice_ref: &ObjectRef, report: &mut impl FnMut(String)) -> Option<bool> {
    match address_type {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        "FQDN" => {
            debug!(slice = %slice_ref, "ignoring FQDN slice");
            None
        }
        other => {
            report(format!("unknown addressType {other:?}"));
            None
        }
    }
}

/// The slice's endpoints with a usable address of its family (`v6`; the first address, as
/// kube-proxy does).
fn slice_endpoints<S: SliceInput + ?Sized>(
    slice: &S,
    v6: bool,
    publish_not_ready: bool,
    node: &NodeContext,
    report: &mut impl FnMut(String),
) -> Vec<EndpointInfo> {
    let mut infos = Vec::new();
    for endpoint in slice.endpoints(node) {
        let parsed = match endpoint.address {
            None => {
                report("endpoint without address; ignored".to_owned());
                continue;
            }
            Some(Address::Parsed(addr)) => Ok(addr),
            Some(Address::Text(raw)) => parse_ip(raw).ok_or(raw),
        };
        match parsed {
            Ok(addr) if addr.is_ipv6() == v6 => infos.push(EndpointInfo {
                addr,
                conditions: Conditions::of(&endpoint, publish_not_ready),
                local: endpoint.local,
                hints: endpoint.hints,
            }),
            Ok(addr) => report(format!("endpoint {addr}: not of the slice's addressType {}", slice.address_type())),
            Err(raw) => report(format!("invalid endpoint address {raw:?}")),
        }
    }
    infos
}

/// Whether an endpoint with this `nodeName` is on the node named `node_name`.
pub(crate) fn is_local(endpoint_node: Option<&str>, node_name: &str) -> bool {
    !node_name.is_empty() && endpoint_node == Some(node_name)
}

/// A slice port: name ("" when unnamed), protocol (`None` when not one we support), number.
struct SlicePort<'a> {
    name: &'a str,
    proto: Option<Protocol>,
    port: u16,
}

/// The slice's ports with a valid number; reports the others.
fn slice_ports<'s>(slice_ports: &'s [EndpointPort], report: &mut impl FnMut(String)) -> Vec<SlicePort<'s>> {
    let mut ports = Vec::new();
    for EndpointPort { name, port, protocol, .. } in slice_ports {
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

/// A port's endpoint as a backend. The state is the endpoint's own (so every entry that lists a
/// backend agrees on it): active if ready, else terminating.
fn backend_of(addr: BackendAddr, info: EndpointInfo) -> Backend {
    let state = if info.conditions.ready { BackendState::Active } else { BackendState::Terminating };
    Backend { addr, state, local: info.local }
}

/// kube-proxy's usable endpoints (`CategorizeEndpoints`) among a port's endpoints, or its local
/// ones only: the ready ones (that `topology` admits) if any, else the serving+terminating
/// ones. Sorted.
fn usable(endpoints: &PortEndpoints, local_only: bool, topology: Topology) -> Vec<Backend> {
    let candidates = || endpoints.iter().filter(move |(_, info)| !local_only || info.local);
    let ready: Vec<Backend> = candidates()
        .filter(|(_, info)| info.conditions.ready && topology.admits(info))
        .map(|(&addr, info)| backend_of(addr, *info))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates()
        .filter(|(_, info)| info.conditions.serving && info.conditions.terminating)
        .map(|(&addr, info)| backend_of(addr, *info))
        .collect()
}

/// Endpoints that are not in `slots` (sorted) but keep their existing connections: the
/// terminating ones, and with `topology` narrowing `slots`, the ready ones it leaves out (the
/// hints change as pods come and go; kube-proxy's conntrack entries outlive such a change too).
fn draining(endpoints: &PortEndpoints, slots: &[Backend], topology: Topology) -> Vec<Backend> {
    endpoints
        .iter()
        .filter(|&(addr, info)| {
            let kept = info.conditions.terminating || (info.conditions.ready && !topology.admits(info));
            kept && slots.binary_search_by_key(addr, |backend| backend.addr).is_err()
        })
        .map(|(&addr, info)| backend_of(addr, *info))
        .collect()
}

/// The backends of one service port, by kind of traffic.
struct PortBackends {
    cluster: Vec<Backend>,
    local: Vec<Backend>,
    /// How the topology hints narrow `cluster` (the local endpoints are not narrowed).
    topology: Topology,
}

impl PortBackends {
    fn of(endpoints: &PortEndpoints) -> Self {
        let topology = Topology::of(endpoints);
        Self { cluster: usable(endpoints, false, topology), local: usable(endpoints, true, Topology::All), topology }
    }
}

// ---------------------------------------------------------------------------------------------
// Desired state

/// One entry per frontend, one health check per Service that has one. Services are visited in
/// `namespace/name` order, so when two claim the same frontend, the first in that order keeps it
/// and the other gets a problem.
fn build_desired(
    plans: &ServicePlans,
    endpoints: &EndpointMap,
    node_addresses: &[IpAddr],
    problems: &mut Vec<Problem>,
) -> Desired {
    let mut ordered: Vec<(String, &ObjectRef, &ServicePlan)> =
        plans.iter().filter_map(|(svc_ref, plan)| Some((svc_ref.to_string(), svc_ref, plan.as_ref()?))).collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));

    let no_endpoints = PortEndpoints::new();
    let mut desired = Desired::default();
    for (_, svc_ref, plan) in ordered {
        let per_port = endpoints.get(svc_ref).map(Vec::as_slice).unwrap_or_default();
        for (index, port) in plan.ports.iter().enumerate() {
            let all_endpoints = per_port.get(index).unwrap_or(&no_endpoints);
            // Each family on its own, as kube-proxy's per-family proxiers: a frontend gets the
            // endpoints of its family, categorized (ready, fallback, topology) among themselves.
            let families = [false, true].map(|v6| {
                let endpoints: PortEndpoints =
                    all_endpoints.iter().filter(|(addr, _)| addr.addr.is_ipv6() == v6).map(|(a, i)| (*a, *i)).collect();
                let backends = PortBackends::of(&endpoints);
                (endpoints, backends)
            });
            for (kind, frontend) in plan.frontends(port, node_addresses) {
                let (port_endpoints, backends) = &families[usize::from(frontend.addr.is_ipv6())];
                let (slots, local_slots, topology) = match kind {
                    FrontendKind::ClusterIp if plan.itp_local => (backends.local.clone(), Vec::new(), Topology::All),
                    FrontendKind::ClusterIp => (backends.cluster.clone(), Vec::new(), backends.topology),
                    _ if plan.etp_local => (backends.cluster.clone(), backends.local.clone(), backends.topology),
                    _ => (backends.cluster.clone(), Vec::new(), backends.topology),
                };
                let mut flags = plan.flags(kind);
                if kind == FrontendKind::ClusterIp && plan.itp_local && slots.is_empty() && !backends.cluster.is_empty()
                {
                    // kube-proxy drops, rather than rejects, what has endpoints elsewhere.
                    flags |= SVC_F_NO_LOCAL_ENDPOINTS;
                }
                let entry = ServiceEntry {
                    service: svc_ref.clone(),
                    port_name: port.name.clone(),
                    flags,
                    affinity_timeout: plan.affinity_timeout.unwrap_or(0),
                    draining: draining(port_endpoints, &slots, topology),
                    slots,
                    local_slots,
                    source_ranges: match (kind, &plan.source_ranges) {
                        (FrontendKind::LoadBalancer, Some(nets)) => {
                            let v6 = frontend.addr.is_ipv6();
                            nets.iter().filter(|net| matches!(net, IpNet::V6(_)) == v6).copied().collect()
                        }
                        _ => Vec::new(),
                    },
                };
                match desired.services.entry(frontend) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(entry);
                    }
                    Entry::Occupied(occupied) => {
                        problems.push(problem(SERVICE, svc_ref, conflict_reason(frontend, &occupied.get().service)));
                    }
                }
            }
        }
        if let Some(node_port) = plan.health_check_node_port {
            let local_ready: BTreeSet<IpAddr> = per_port
                .iter()
                .flat_map(BTreeMap::values)
                .filter(|info| info.local && info.conditions.ready && Family::of(info.addr) == plan.primary)
                .map(|info| info.addr)
                .collect();
            desired
                .health_checks
                .insert(svc_ref.clone(), HealthCheck { node_port, local_endpoints: local_ready.len() });
        }
    }
    desired
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The reason of the problem a Service gets for a frontend that Service `holder` (maybe itself,
/// through another of its addresses) already has.
#[must_use]
pub fn conflict_reason(frontend: Frontend, holder: &ObjectRef) -> String {
    format!("frontend {frontend} is already used by Service {holder}; ignored")
}

/// `namespace/name` of an object (namespace defaulted), `None` without a name.
pub(crate) fn object_ref(meta: &ObjectMeta) -> Option<ObjectRef> {
    let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
    Some(ObjectRef::new(namespace_of(meta), name))
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
    Problem { kind, object: object.to_string(), reason: reason.into(), transient: false }
}

/// Parses an IP address like Kubernetes' `ParseIPSloppy`: IPv4 octets with leading zeros,
/// which old API objects may hold, are read as decimal.
pub(crate) fn parse_ip(raw: &str) -> Option<IpAddr> {
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
mod tests;

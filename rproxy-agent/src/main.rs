//! `rproxy-agent`: the rproxy node agent. See `rproxy-agent --help` and README.md.
#![expect(clippy::doc_markdown, reason = "doc comments here are --help text, shown as written")]
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use ipnet::IpNet;
use rproxy_agent::{
    bpf::{
        datapath::{self, MapSizes, XdpMode},
        dump, explain, monitor,
    },
    health::proxy,
    node::{
        devices::{self, DevicePattern},
        pods::PodSockets,
        snat::PortRange,
    },
    run,
};
use tracing::error;
use tracing_subscriber::EnvFilter;

/// rproxy: a kube-proxy replacement on eBPF. Translates Kubernetes Service addresses to backend
/// pods (and back) in TC programs on the pod devices, driven by Services and EndpointSlices.
#[derive(Parser, Debug)]
#[command(name = "rproxy-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the datapath, attach it to pod devices and keep the maps in sync with the Services and
    /// EndpointSlices of the Kubernetes API (or of a manifests directory).
    Run(Box<RunArgs>),
    /// Detach everything an agent attached and remove its pinned maps and links.
    Cleanup {
        /// The bpffs directory the agent used (`run --bpffs`).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the pinned maps of an agent: services, backends, rev-NAT, conntrack, route cache, counters.
    Dump {
        /// The bpffs directory the agent used (`run --bpffs`).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Also print every conntrack entry and cached route (otherwise only their numbers).
        #[arg(long)]
        conntrack: bool,
        /// Output format: 'text', or 'json' (one object: config, ipv4, ipv6, counters).
        #[arg(short = 'o', long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Explain what the datapath would do with one packet, from the live maps (which it leaves
    /// unchanged): the Service frontend matched, the backend or the candidates and why some are
    /// excluded, the translation, the verdict and its reason.
    Explain {
        /// The bpffs directory the agent used (`run --bpffs`).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// The packet's protocol: 'tcp' or 'udp'.
        #[arg(long, value_parser = ["tcp", "udp"])]
        proto: String,
        /// The packet's source, IP:PORT ([IPv6]:PORT).
        #[arg(long, value_name = "IP:PORT")]
        src: SocketAddr,
        /// The packet's destination, IP:PORT.
        #[arg(long, value_name = "IP:PORT")]
        dst: SocketAddr,
        /// Where the packet comes from: a pod, an external device (--devices), or a
        /// host-network socket.
        #[arg(long, value_enum, default_value_t = explain::Origin::Pod)]
        from: explain::Origin,
        /// The agent's metrics address, asked for the Services' names (GET /frontends). Empty:
        /// names are not shown.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10249", value_parser = parse_bind)]
        agent: Bind,
        /// Output format: 'text', or 'json' (fields verdict, reason, service, backend, nat,
        /// candidates, steps).
        #[arg(short = 'o', long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Stream the datapath's drops and translations (packet, reason, service, backend) while it
    /// runs: turns the programs' event switch on, and off again on exit (Ctrl-C).
    Monitor {
        /// The bpffs directory the agent used (`run --bpffs`).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Only drops (and rejections), not translations.
        #[arg(long)]
        drops_only: bool,
        /// Output format: 'text', or 'json' (one object per line).
        #[arg(short = 'o', long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
    },
}

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/rproxy";

/// Log filter without `RPROXY_LOG`. kube-client's HTTP layer logs every failed request at error
/// level; the watches report their own failures (a warning once one persists), so those lines
/// are left out.
const DEFAULT_LOG: &str = "info,kube_client::client::builder=off";

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Read Services and EndpointSlices from this directory of Kubernetes YAML files instead of
    /// the API (v1 Service, discovery.k8s.io/v1 EndpointSlice; multi-document files and `kind:
    /// List` allowed). Changes apply within a second.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Without it (and without --manifests): $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: endpoints whose nodeName matches are node-local.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: String,
    /// Host-side pod interfaces to attach to: comma-separated globs (e.g. 'veth*,cali*,lxc*').
    /// Devices created later are attached as they appear.
    #[arg(long, value_name = "GLOB")]
    pod_devices: String,
    /// bpffs directory for this agent's pinned maps and links. Agents with different
    /// directories do not touch each other.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Seconds between conntrack garbage-collection passes.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    ct_gc_interval: u64,
    /// Entries of the IPv4 conntrack table (RPX_CT4, an LRU hash: two per translated flow; the
    /// least recently used go first when it is full). About 112 bytes of kernel memory each.
    /// 4096 to 16777216. A pinned table of another size is copied into a new one at the next
    /// start (a smaller one keeps the most recently used flows).
    #[arg(long, value_name = "N", default_value_t = rproxy_common::limits::CT_MAX, value_parser = parse_map_max)]
    ct_max: u32,
    /// Entries of the IPv6 conntrack table (RPX_CT6), as --ct-max; about 160 bytes each. An
    /// IPv4-only cluster can set the minimum, 4096.
    #[arg(long, value_name = "N", default_value_t = rproxy_common::limits::CT_MAX, value_parser = parse_map_max)]
    ct_max_ipv6: u32,
    /// Entries of each family's service table (RPX_SVC4, RPX_SVC6: one per Service port and
    /// address, plus one per backend of each, twice under a node-local traffic policy) and of
    /// the affinity matches (RPX_AFFINITY_MATCH). 16 bytes each of buckets at creation, about
    /// 96 more per entry as used.
    /// 4096 to 16777216. A pinned table of another size is copied into a new one at the next
    /// start, without dropping a connection; one that holds more entries is refused.
    #[arg(long, value_name = "N", default_value_t = rproxy_common::limits::SERVICES_MAX, value_parser = parse_map_max)]
    service_map_max: u32,
    /// Size of each family's backend array (RPX_BE4, RPX_BE6): one id per backend (address,
    /// port, protocol) of the node's Services, ids 1 to N-1. Preallocated: 8 bytes each for
    /// IPv4, 24 for IPv6. 4096 to 16777216; changed at a restart as --service-map-max (a
    /// smaller array must still hold the highest id in use).
    #[arg(long, value_name = "N", default_value_t = rproxy_common::limits::BACKENDS_MAX, value_parser = parse_map_max)]
    backend_map_max: u32,
    /// Count packets, bytes and new flows per Service frontend in the datapath (RPX_SVC_STATS,
    /// exported as rproxy_service_* on /metrics): a per-CPU array of 65,536 entries, about
    /// 1.5 MiB of kernel memory per CPU. 'false' sizes it to one entry, which counts nothing.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    service_counters: bool,
    /// Load this eBPF object instead of the one built into the agent (development, and tests of
    /// upgrades from an older datapath). It must have this agent's programs and maps.
    #[arg(long, value_name = "PATH")]
    ebpf_object: Option<PathBuf>,
    /// Seconds between full device rescans (new devices and addresses are also found at once
    /// through netlink notifications).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    rescan_interval: u64,
    /// The node's external devices, comma-separated (e.g. 'eth0,eth1'). NodePorts answer on
    /// their addresses (IPv4 and IPv6, not IPv6 link-local), re-read when addresses or links
    /// change. Empty: no NodePort.
    #[arg(long, value_name = "IF[,IF...]", value_delimiter = ',')]
    devices: Vec<String>,
    /// Only the device addresses inside one of these CIDRs carry NodePorts, comma-separated,
    /// either family (e.g. '10.0.0.0/8,192.168.1.5/32,2001:db8::/64'). Default: every address
    /// of --devices but IPv6 link-local ones.
    #[arg(long, value_name = "CIDR[,CIDR...]", value_delimiter = ',', value_parser = devices::parse_cidr)]
    nodeport_addresses: Vec<IpNet>,
    /// How north-south packets are handled on --devices: XDP in the driver with a fallback to
    /// generic XDP ('auto'), only one of the two ('native', 'generic'), or TC only ('tc'). In the
    /// XDP modes a TC program on the same device handles what XDP hands up.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// cgroup v2 directory whose processes' sockets reach services directly (connect/sendmsg
    /// hooks): those of the agent's own network namespace (host-network processes) and, as
    /// --pod-sockets says, pods' TCP connections. Default: the root of the cgroup v2 mount.
    /// 'none' disables the hooks.
    #[arg(long, value_name = "PATH|none")]
    cgroup: Option<String>,
    /// Which pods' TCP connections to services the socket hooks (--cgroup) send to a backend at
    /// connect(), so that their packets need no NAT: 'all' (every network namespace but the
    /// agent's, i.e. the node's pods), 'none' (translated on the pods' devices, packet by
    /// packet, e.g. for a service mesh that must see service addresses), or a glob over network
    /// namespace files, such as '/run/netns/lab-n1-*' (only those: nodes that share one kernel
    /// and cgroup tree, as in the netns lab). Pods' UDP, and Services with ClientIP affinity or
    /// loadBalancerSourceRanges, are always translated on the devices.
    #[arg(long, value_name = "all|none|GLOB", default_value = "all", value_parser = parse_pod_sockets)]
    pod_sockets: PodSockets,
    /// Address and port of the agent's own health endpoints, /healthz and /livez, as
    /// kube-proxy's (load balancers probe /healthz for externalTrafficPolicy Cluster). 503 when a
    /// change has not reached the maps within 60 s, or (/healthz only) when the Node is being
    /// deleted or tainted ToBeDeletedByClusterAutoscaler. Empty: not served.
    #[arg(long, value_name = "IP:PORT", default_value = proxy::DEFAULT_BIND, value_parser = parse_bind)]
    healthz_bind_address: Bind,
    /// Address and port of /metrics (Prometheus, OpenMetrics text), as kube-proxy's: its sync
    /// and network programming metrics under their kube-proxy names, and rproxy_* metrics (the
    /// datapath's counters, map use, conntrack entries, rejected objects, watch state).
    /// '0.0.0.0' listens on IPv6 too. Empty: not served.
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:10249", value_parser = parse_bind)]
    metrics_bind_address: Bind,
    /// Source ports given to north-south flows that go to a backend on another node (SNAT to
    /// this node's address, externalTrafficPolicy Cluster), and to pods' TCP flows translated on
    /// their devices (the pod's port folded into the range, on its own address, so that they
    /// never share a tuple with the pod's connections straight to backends: keep the range at
    /// least as large as the pods' ephemeral port range), MIN-MAX with MIN >= 1024. Each backend
    /// can take about (MAX - MIN + 1) / 60 new north-south flows per second from one node before
    /// a port comes round within its TIME_WAIT. With --devices, the agent refuses a range that
    /// overlaps net.ipv4.ip_local_port_range unless net.ipv4.ip_local_reserved_ports covers the
    /// overlap: the node's own connections must not take these ports. Default: below the
    /// NodePort range (30000-32767) and the kernel's default ephemeral ports (32768-60999).
    #[arg(long, value_name = "MIN-MAX", default_value_t = PortRange::DEFAULT)]
    snat_port_range: PortRange,
    /// Whether ClusterIPs answer packets that arrive on --devices (routed to the node from
    /// outside the cluster), as kube-proxy's rules do: a backend on this node gets the client's
    /// address, one elsewhere the node's (SNAT). 'false' keeps ClusterIPs to pods and the node
    /// itself (Cilium's default).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    external_cluster_ip: bool,
}

/// `--ct-max`, `--ct-max-ipv6`, `--service-map-max`, `--backend-map-max`: a table size in
/// [`MapSizes::MIN`, `MapSizes::MAX`].
fn parse_map_max(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().parse().map_err(|e| format!("'{s}': {e}"))?;
    if (MapSizes::MIN..=MapSizes::MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n}: between {} and {} entries", MapSizes::MIN, MapSizes::MAX))
    }
}

/// `--healthz-bind-address`, `--metrics-bind-address`: an address, or none (empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bind(Option<SocketAddr>);

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.trim().is_empty() {
        return Ok(Bind(None));
    }
    s.trim().parse().map(|a| Bind(Some(a))).map_err(|e| format!("'{s}': {e} (expected IP:PORT, or empty)"))
}

fn parse_pod_sockets(s: &str) -> Result<PodSockets, String> {
    PodSockets::parse(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("RPROXY_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG)))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs collected by a container runtime stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_agent(*args),
        Command::Cleanup { bpffs } => datapath::cleanup(&bpffs),
        Command::Dump { bpffs, conntrack, output } => {
            dump::dump(&bpffs, conntrack, output == "json", &mut std::io::stdout())
        }
        Command::Explain { bpffs, proto, src, dst, from, agent, output } => {
            let args = explain::Args {
                proto: if proto == "tcp" { rproxy_common::proto::TCP } else { rproxy_common::proto::UDP },
                src,
                dst,
                origin: from,
                agent: agent.0,
                json: output == "json",
            };
            explain::run(&bpffs, &args, &mut std::io::stdout().lock())
        }
        Command::Monitor { bpffs, drops_only, output, count, duration } => {
            let opts = monitor::Options {
                drops_only,
                json: output == "json",
                count,
                duration: duration.map(Duration::from_secs),
            };
            monitor::run(&bpffs, opts, &mut std::io::stdout().lock())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// One glibc malloc arena for the whole agent (before any thread starts). Its work is on one
/// thread; the others (loading the programs, conntrack GC passes, servers) allocate little
/// but briefly, and each would otherwise keep an arena of its own: 8 MiB of peak RSS at 30,000
/// Services, for no speed (`MALLOC_ARENA_MAX`, set in the environment, still wins).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: a glibc tunable, set before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

fn run_agent(args: RunArgs) -> rproxy_agent::Result<()> {
    rproxy_agent::health::http::raise_fd_limit();
    one_malloc_arena();
    let cfg = run::Config {
        source: match args.manifests {
            Some(dir) => run::Source::Manifests(dir),
            None => run::Source::Kube { kubeconfig: args.kubeconfig },
        },
        node_name: args.node_name,
        pod_devices: DevicePattern::parse(&args.pod_devices)?,
        bpffs: args.bpffs,
        gc_interval: Duration::from_secs(args.ct_gc_interval.max(1)),
        map_sizes: MapSizes {
            ct4: args.ct_max,
            ct6: args.ct_max_ipv6,
            services: args.service_map_max,
            backends: args.backend_map_max,
            svc_stats: if args.service_counters { rproxy_common::limits::REV_NAT_MAX } else { 1 },
        },
        ebpf_object: args.ebpf_object,
        rescan_interval: Duration::from_secs(args.rescan_interval.max(1)),
        devices: args.devices.iter().map(|d| d.trim()).filter(|d| !d.is_empty()).map(str::to_owned).collect(),
        nodeport_addresses: args.nodeport_addresses,
        xdp_mode: args.xdp_mode,
        cgroup: match args.cgroup.as_deref() {
            Some("none") => run::Cgroup::Disabled,
            Some(path) => run::Cgroup::Path(PathBuf::from(path)),
            None => run::Cgroup::Auto,
        },
        pod_sockets: args.pod_sockets,
        healthz_bind: args.healthz_bind_address.0,
        metrics_bind: args.metrics_bind_address.0,
        snat_ports: args.snat_port_range,
        external_cluster_ip: args.external_cluster_ip,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| rproxy_agent::Error::Io { what: "starting the runtime".into(), source })?;
    let result = rt.block_on(run::run(cfg));
    // A conntrack GC pass still walking the tables on its thread is not waited for: each of its
    // map operations is whole, and the next agent's passes pick up where it stopped.
    rt.shutdown_timeout(Duration::ZERO);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let base = ["rproxy-agent", "run", "--node-name", "n", "--pod-devices", "veth*"];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn north_south_flags() {
        let args = run_args(&[]).unwrap();
        assert!(args.devices.is_empty() && args.nodeport_addresses.is_empty());
        let args = run_args(&["--devices", "eth0,eth1", "--nodeport-addresses", "10.0.0.0/8,192.0.2.7/32"]).unwrap();
        assert_eq!(args.devices, ["eth0", "eth1"]);
        let nets: Vec<IpNet> = ["10.0.0.0/8", "192.0.2.7/32"].iter().map(|n| n.parse().unwrap()).collect();
        assert_eq!(args.nodeport_addresses, nets);
        let dual = run_args(&["--nodeport-addresses", "10.0.0.0/8,fd00::/64"]).unwrap();
        assert_eq!(dual.nodeport_addresses[1], "fd00::/64".parse::<IpNet>().unwrap());
        let err = run_args(&["--nodeport-addresses", "10.0.0.0/8,fd00::1"]).unwrap_err().to_string();
        assert!(err.contains("fd00::1") && err.contains("prefix length"), "{err}");
    }

    #[test]
    fn snat_port_range() {
        assert_eq!(run_args(&[]).unwrap().snat_port_range, PortRange::DEFAULT);
        let args = run_args(&["--snat-port-range", "40000-40015"]).unwrap();
        assert_eq!(args.snat_port_range, PortRange { first: 40000, last: 40015 });
        let err = run_args(&["--snat-port-range", "100-200"]).unwrap_err().to_string();
        assert!(err.contains("privileged"), "{err}");
    }

    #[test]
    fn external_cluster_ip() {
        assert!(run_args(&[]).unwrap().external_cluster_ip);
        assert!(!run_args(&["--external-cluster-ip", "false"]).unwrap().external_cluster_ip);
        assert!(run_args(&["--external-cluster-ip", "maybe"]).is_err());
    }

    #[test]
    fn conntrack_sizes() {
        let args = run_args(&[]).unwrap();
        assert_eq!((args.ct_max, args.ct_max_ipv6), (524_288, 524_288));
        let args = run_args(&["--ct-max", "1000000", "--ct-max-ipv6", "4096"]).unwrap();
        assert_eq!((args.ct_max, args.ct_max_ipv6), (1_000_000, 4096));
        for bad in ["4095", "16777217", "lots"] {
            assert!(run_args(&["--ct-max", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_and_backend_table_sizes() {
        let args = run_args(&[]).unwrap();
        assert_eq!((args.service_map_max, args.backend_map_max), (262_144, 131_072));
        let args = run_args(&["--service-map-max", "524288", "--backend-map-max", "1048576"]).unwrap();
        assert_eq!((args.service_map_max, args.backend_map_max), (524_288, 1_048_576));
        for flag in ["--service-map-max", "--backend-map-max"] {
            for bad in ["4095", "16777217", "-1"] {
                assert!(run_args(&[flag, bad]).is_err(), "{flag} {bad}");
            }
        }
    }

    #[test]
    fn healthz_bind_address() {
        let addr = |a: &str| Some(a.parse::<SocketAddr>().unwrap());
        assert_eq!(run_args(&[]).unwrap().healthz_bind_address.0, addr("0.0.0.0:10256"));
        let args = run_args(&["--healthz-bind-address", "127.0.0.1:9256"]).unwrap();
        assert_eq!(args.healthz_bind_address.0, addr("127.0.0.1:9256"));
        assert_eq!(run_args(&["--healthz-bind-address", ""]).unwrap().healthz_bind_address.0, None);
        assert_eq!(run_args(&[]).unwrap().metrics_bind_address.0, addr("0.0.0.0:10249"));
        assert_eq!(run_args(&["--metrics-bind-address", ""]).unwrap().metrics_bind_address.0, None);
        let err = run_args(&["--healthz-bind-address", "10256"]).unwrap_err().to_string();
        assert!(err.contains("expected IP:PORT"), "{err}");
    }
}

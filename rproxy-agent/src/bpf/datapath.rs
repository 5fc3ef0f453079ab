//! Loading the embedded eBPF object, its pinned maps, and attaching its TC programs.
//!
//! Everything this agent owns lives under one bpffs directory (`--bpffs`):
//! - `RPX_*`: the maps, pinned by name (`rproxy_common::map_names`); a restarted agent reuses
//!   them, so translation state and conntrack survive restarts;
//! - `links/<hook>/<ifname>`: links (bpffs forbids `.` in names, so a `.` in an interface name is
//!   stored as `%2e`, and `%` as `%25`), pinned so that the programs stay attached when the agent
//!   exits. Hooks: `ingress` and `egress` (TCX, pod devices), `ext-ingress`, `ext-egress` (TCX,
//!   external devices) and `xdp` (external devices). A restarted agent swaps its freshly loaded
//!   program into the existing link (`BPF_LINK_UPDATE`, atomic), so no packet goes untranslated
//!   during an upgrade.
use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use rproxy_common::{
    AffinityKey4, AffinityKey6, AffinityMatch, AffinityValue, Backend4, Backend6, Config, CtKey4, CtKey6, CtValue4,
    CtValue6, RevNat4, RevNat6, RouteKey4, RouteKey6, RouteValue, ServiceKey4, ServiceKey6, ServiceValue, SrcRange4,
    SrcRange6, Stat, calls, map_names, prog_names,
};
use tracing::{debug, info, warn};

use super::migrate;
use crate::{
    Error, Result,
    node::{pods::PodSockets, snat::PortRange},
};

/// The eBPF object built by build.rs from rproxy-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rproxy.bpf.o"));

const LINKS_DIR: &str = "links";
static SCRATCH_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Typed handles on the maps.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey4, ServiceValue>,
    /// Indexed by backend id; an all-zero entry is a free id.
    pub backends: Array<MapData, Backend4>,
    /// Indexed by rev-NAT id; an all-zero entry is a free id.
    pub rev_nat: Array<MapData, RevNat4>,
    pub conntrack: HashMap<MapData, CtKey4, CtValue4>,
    pub stats: PerCpuArray<MapData, u64>,
    /// The service filter (`rproxy_common::filter`).
    pub svc_filter: Array<MapData, u64>,
    /// The backend filter (`rproxy_common::filter`).
    pub be_filter: Array<MapData, u64>,
    /// `loadBalancerSourceRanges` (`rproxy_common::SrcRange4`).
    pub src_range: LpmTrie<MapData, SrcRange4, u8>,
    /// `ClientIP` affinity: the backend each client last got (LRU).
    pub affinity: HashMap<MapData, AffinityKey4, AffinityValue>,
    /// The backends affinity may use per frontend (`rproxy_common::AffinityMatch`).
    pub affinity_match: HashMap<MapData, AffinityMatch, u8>,
    /// The north-south forwarding's route cache (`rproxy_common::route`): written by the
    /// programs only.
    pub routes: HashMap<MapData, RouteKey4, RouteValue>,
    // The IPv6 twins of the maps above; the filters, affinity matches and counters serve both.
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub backends6: Array<MapData, Backend6>,
    pub rev_nat6: Array<MapData, RevNat6>,
    pub conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    pub src_range6: LpmTrie<MapData, SrcRange6, u8>,
    pub affinity6: HashMap<MapData, AffinityKey6, AffinityValue>,
    pub routes6: HashMap<MapData, RouteKey6, RouteValue>,
}

/// The loaded object: programs verified and loaded, maps created or reused.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// The tail calls' program arrays (`rproxy_common::calls`), held open: a program array the
    /// kernel finds without a file descriptor or pin is emptied (a private load has no pin).
    _calls: Vec<ProgramArray<MapData>>,
    /// The old maps of a migration in progress (`migrate`), held until `finish_migration`.
    legacy: Option<migrate::Legacy>,
    /// Every map was created by this load (none was pinned, none copied into): they hold nothing.
    created_empty: bool,
}

/// Which TC hook of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Pod device, packets leaving the pod: service DNAT.
    FromPod,
    /// Pod device, packets entering the pod: reverse NAT.
    ToPod,
    /// External device, packets arriving: north-south (the TC fallback of XDP, and what XDP
    /// hands up).
    ExtIngress,
    /// External device, packets leaving: reverse NAT of replies from this node's backends.
    ExtEgress,
}

impl Hook {
    pub const POD: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    pub const EXTERNAL: [Hook; 2] = [Hook::ExtIngress, Hook::ExtEgress];

    fn program(self) -> &'static str {
        match self {
            Self::FromPod => prog_names::FROM_POD,
            Self::ToPod => prog_names::TO_POD,
            Self::ExtIngress => prog_names::EXT_INGRESS,
            Self::ExtEgress => prog_names::EXT_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromPod | Self::ExtIngress => TcAttachType::Ingress,
            Self::ToPod | Self::ExtEgress => TcAttachType::Egress,
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::FromPod => "ingress",
            Self::ToPod => "egress",
            Self::ExtIngress => "ext-ingress",
            Self::ExtEgress => "ext-egress",
        }
    }
}

/// `--xdp-mode`: how north-south packets are handled on the external devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// XDP in the driver where it supports it, generic XDP otherwise.
    #[default]
    Auto,
    /// XDP in the driver; attaching fails if the driver cannot.
    Native,
    /// Generic (skb) XDP: works on every device, slower than native.
    Generic,
    /// No XDP: the TC ingress program does the same work.
    Tc,
}

/// Where XDP ended up on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttached {
    Native,
    Generic,
    /// A pinned XDP link from an earlier run got the new program; its mode is unchanged.
    Replaced,
    None,
}

const XDP_DIR: &str = "xdp";
const CGROUP_DIR: &str = "cgroup";
/// The socket programs, in attach order.
const SOCK_PROGRAMS: [&str; 8] = [
    prog_names::SOCK_CONNECT4,
    prog_names::SOCK_SENDMSG4,
    prog_names::SOCK_RECVMSG4,
    prog_names::SOCK_GETPEERNAME4,
    prog_names::SOCK_CONNECT6,
    prog_names::SOCK_SENDMSG6,
    prog_names::SOCK_RECVMSG6,
    prog_names::SOCK_GETPEERNAME6,
];

/// Sizes of the maps an operator chooses: entries of each family's conntrack table (two per
/// translated flow; `--ct-max`, `--ct-max-ipv6`), of each family's service table and of the
/// affinity matches (`--service-map-max`), of each family's backend array (`--backend-map-max`:
/// ids are `1..backends`), and of the per-Service counters (`--service-counters`: one per rev-NAT
/// id, or 1, which counts nothing). A pinned table of another size is migrated to one of the new
/// size at the next start (`migrate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub ct4: u32,
    pub ct6: u32,
    pub services: u32,
    pub backends: u32,
    pub svc_stats: u32,
}

impl MapSizes {
    /// The object's own sizes.
    pub const DEFAULT: Self = Self {
        ct4: rproxy_common::limits::CT_MAX,
        ct6: rproxy_common::limits::CT_MAX,
        services: rproxy_common::limits::SERVICES_MAX,
        backends: rproxy_common::limits::BACKENDS_MAX,
        svc_stats: rproxy_common::limits::REV_NAT_MAX,
    };
    /// Smallest table accepted: an LRU table keeps per-CPU free lists, and a tiny one would evict
    /// live flows at once; a smaller service or backend table saves next to nothing.
    pub const MIN: u32 = 4096;
    /// Largest table accepted (16 Mi entries: about 2.6 GB of kernel memory for IPv6's
    /// conntrack).
    pub const MAX: u32 = 1 << 24;

    /// The size wanted for map `name`, if it is one of these.
    #[must_use]
    pub fn of(&self, name: &str) -> Option<u32> {
        match name {
            map_names::CT4 => Some(self.ct4),
            map_names::CT6 => Some(self.ct6),
            map_names::SERVICES4 | map_names::SERVICES6 | map_names::AFFINITY_MATCH => Some(self.services),
            map_names::BACKENDS4 | map_names::BACKENDS6 => Some(self.backends),
            map_names::SVC_STATS => Some(self.svc_stats),
            _ => None,
        }
    }
}

impl Datapath {
    /// Loads the embedded object. With `pin_dir`, maps are pinned there (and reused if already
    /// pinned); without, they are private to this process (packet tests, benchmarks) and no
    /// link is pinned.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_object(EBPF_OBJECT, pin_dir)
    }

    /// `load` with the conntrack tables sized by `sizes`.
    pub fn load_sized(pin_dir: Option<&Path>, sizes: MapSizes) -> Result<Self> {
        Self::load_object_sized(EBPF_OBJECT, pin_dir, sizes)
    }

    /// `load` with another build of the eBPF object (`cargo xtask bench --baseline-object`
    /// compares two builds side by side). The object must have this agent's programs and maps.
    pub fn load_object(object: &[u8], pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_object_sized(object, pin_dir, MapSizes::DEFAULT)
    }

    /// `load_object` with the conntrack tables sized by `sizes`.
    pub fn load_object_sized(object: &[u8], pin_dir: Option<&Path>, sizes: MapSizes) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            if let Some(n) = sizes.of(name) {
                loader.map_max_entries(name, n);
            }
        }
        // Every map is pinned (see below), in /sys/fs/bpf itself were there no directory.
        // Private loads pin into a unique scratch directory instead and unpin at once: the
        // maps then live only as long as this process holds them.
        let scratch = match pin_dir {
            Some(_) => None,
            None => Some(PathBuf::from(format!(
                "/sys/fs/bpf/rpx{}{}-private",
                std::process::id(),
                SCRATCH_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))),
        };
        let dir = pin_dir.or(scratch.as_deref()).expect("one of the two is set");
        // Before creating anything: on a sysfs (`ip netns exec` remounts /sys) the directories
        // cannot even be made, and the error would hide the real cause.
        ensure_bpffs(dir)?;
        for sub in Hook::POD.iter().chain(&Hook::EXTERNAL).map(|h| h.dir()).chain([XDP_DIR, CGROUP_DIR]) {
            let links = dir.join(LINKS_DIR).join(sub);
            std::fs::create_dir_all(&links)
                .map_err(|source| Error::Io { what: format!("creating {}", links.display()), source })?;
        }
        if pin_dir.is_some() {
            restrict(dir)?;
        }
        let parsed = aya_obj::Object::parse(object).map_err(|e| Error::Object(e.to_string()))?;
        // Maps pinned without BTF by an older agent, or of another size than asked for (of the
        // right shape otherwise: checked first), are set aside and copied into new ones
        // (`migrate`).
        let legacy = match pin_dir {
            Some(_) => {
                check_pinned_maps(&parsed, dir, sizes)?;
                migrate::set_aside(&parsed, dir, sizes)?
            }
            None => None,
        };
        // The maps are BTF maps, which say nothing about pinning: each gets its path here. (An
        // older object's maps are declared pinned by name and go to the same paths.)
        for name in map_names::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
        loader.default_map_pin_directory(dir);
        let created_empty = legacy.is_none() && map_names::ALL.iter().all(|name| !dir.join(name).exists());
        let result = loader.load(object);
        if let Some(tmp) = &scratch {
            std::fs::remove_dir_all(tmp)
                .map_err(|source| Error::Io { what: format!("removing {}", tmp.display()), source })?;
        }
        let mut ebpf = result?;
        if let Some(legacy) = &legacy {
            let copied = legacy.copy()?;
            info!(entries = copied, "old maps copied into the new ones");
        }
        // The tail-called programs first: the arrays must be full before any program that
        // calls through them is attached (here or, on a restart, by a link update). An object
        // from before them (`--baseline-object` of an older build) has none.
        let mut calls = Vec::new();
        if ebpf.map(map_names::CALLS_TC).is_some() {
            for (_, name) in calls::TC {
                program_as::<SchedClassifier>(&mut ebpf, name)?
                    .load()
                    .map_err(|source| Error::Program { name, source })?;
            }
            for (_, name) in calls::XDP {
                program_as::<Xdp>(&mut ebpf, name)?.load().map_err(|source| Error::Program { name, source })?;
            }
            calls.push(fill_calls(&mut ebpf, map_names::CALLS_TC, &calls::TC)?);
            calls.push(fill_calls(&mut ebpf, map_names::CALLS_XDP, &calls::XDP)?);
        } else {
            warn!("an eBPF object without tail calls (a build from before IPv6): IPv6 packets pass untranslated");
        }
        for name in [
            prog_names::FROM_POD,
            prog_names::TO_POD,
            prog_names::NOOP,
            prog_names::EXT_INGRESS,
            prog_names::EXT_EGRESS,
        ] {
            program_as::<SchedClassifier>(&mut ebpf, name)?.load().map_err(|source| Error::Program { name, source })?;
        }
        for name in [prog_names::XDP_EXT, prog_names::XDP_NOOP] {
            program_as::<Xdp>(&mut ebpf, name)?.load().map_err(|source| Error::Program { name, source })?;
        }
        for name in SOCK_PROGRAMS {
            program_as::<CgroupSockAddr>(&mut ebpf, name)?.load().map_err(|source| Error::Program { name, source })?;
        }
        // Objects before it lack it (`--ebpf-object`): their entries wait for the LRU.
        if ebpf.program(prog_names::SOCK_RELEASE).is_some() {
            let name = prog_names::SOCK_RELEASE;
            program_as::<CgroupSock>(&mut ebpf, name)?.load().map_err(|source| Error::Program { name, source })?;
        }
        start_ebpf_log(&mut ebpf);
        Ok(Self { ebpf, pin_dir: pin_dir.map(Path::to_path_buf), _calls: calls, legacy, created_empty })
    }

    /// Whether every map was created by this load, so that they hold nothing yet (no earlier
    /// agent's state to adopt: reading them would find only zeros).
    #[must_use]
    pub fn created_empty(&self) -> bool {
        self.created_empty
    }

    /// During a migration to new maps (`migrate`): copies the flows the old programs
    /// created since the load, just before the new programs are attached.
    pub fn top_up_migration(&self) -> Result<()> {
        if let Some(legacy) = &self.legacy {
            let copied = legacy.top_up()?;
            debug!(entries = copied, "flows the old programs created since the load copied");
        }
        Ok(())
    }

    /// Ends a migration to new maps (`migrate`), if this load began one: to be called
    /// once the new programs are attached to every device, so that the old ones no longer run.
    pub fn finish_migration(&mut self) -> Result<()> {
        self.legacy.take().map_or(Ok(()), migrate::Legacy::finish)
    }

    /// Takes the typed map handles out of the object (once).
    pub fn take_maps(&mut self) -> Result<Maps> {
        Ok(Maps {
            services: take(&mut self.ebpf, map_names::SERVICES4)?,
            backends: take(&mut self.ebpf, map_names::BACKENDS4)?,
            rev_nat: take(&mut self.ebpf, map_names::REV_NAT4)?,
            conntrack: take(&mut self.ebpf, map_names::CT4)?,
            stats: take(&mut self.ebpf, map_names::STATS)?,
            svc_filter: take(&mut self.ebpf, map_names::SVC_FILTER)?,
            be_filter: take(&mut self.ebpf, map_names::BE_FILTER)?,
            src_range: take(&mut self.ebpf, map_names::SRC_RANGE4)?,
            affinity: take(&mut self.ebpf, map_names::AFFINITY4)?,
            affinity_match: take(&mut self.ebpf, map_names::AFFINITY_MATCH)?,
            routes: take(&mut self.ebpf, map_names::ROUTE4)?,
            services6: take(&mut self.ebpf, map_names::SERVICES6)?,
            backends6: take(&mut self.ebpf, map_names::BACKENDS6)?,
            rev_nat6: take(&mut self.ebpf, map_names::REV_NAT6)?,
            conntrack6: take(&mut self.ebpf, map_names::CT6)?,
            src_range6: take(&mut self.ebpf, map_names::SRC_RANGE6)?,
            affinity6: take(&mut self.ebpf, map_names::AFFINITY6)?,
            routes6: take(&mut self.ebpf, map_names::ROUTE6)?,
        })
    }

    /// A loaded TC program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        program_as::<SchedClassifier>(&mut self.ebpf, name)
    }

    /// A loaded XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut Xdp> {
        program_as::<Xdp>(&mut self.ebpf, name)
    }

    /// Attaches (or, after a restart, atomically re-attaches) both pod programs to `ifname`.
    /// With a pin directory the links are pinned and outlive this process.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        for hook in Hook::POD {
            self.attach_hook(ifname, hook)?;
        }
        Ok(())
    }

    /// Attaches the north-south programs to external device `ifname`: TC ingress and egress
    /// always (in XDP modes the TC ingress program handles what XDP hands up), XDP per `mode`.
    /// Switching to `XdpMode::Tc` removes an XDP link an earlier run pinned.
    pub fn attach_external(&mut self, ifname: &str, mode: XdpMode) -> Result<XdpAttached> {
        for hook in Hook::EXTERNAL {
            self.attach_hook(ifname, hook)?;
        }
        let pin = self.pin_dir.as_ref().map(|d| d.join(LINKS_DIR).join(XDP_DIR).join(escape(ifname)));
        if mode == XdpMode::Tc {
            if let Some(pin) = &pin {
                remove_pin(pin)?;
            }
            return Ok(XdpAttached::None);
        }
        let name = prog_names::XDP_EXT;
        let prog = program_as::<Xdp>(&mut self.ebpf, name)?;
        let iface_err = |reason: String| Error::Interface { name: ifname.to_owned(), reason };
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let replaced = PinnedLink::from_pin(pin)
                .map_err(|e| describe(&e))
                .and_then(|pinned| XdpLink::try_from(FdLink::from(pinned)).map_err(|e| describe(&e)))
                .and_then(|link| prog.attach_to_link(link).map_err(|e| describe(&e)));
            match replaced {
                Ok(id) => {
                    drop(prog.take_link(id).map_err(|source| Error::Program { name, source })?);
                    debug!(ifname, "XDP program replaced in pinned link");
                    return Ok(XdpAttached::Replaced);
                }
                Err(e) => {
                    debug!(ifname, error = %e, "stale pinned XDP link, attaching a new one");
                    remove_pin(pin)?;
                }
            }
        }
        let (id, attached) = match mode {
            XdpMode::Native => (prog.attach(ifname, aya::programs::XdpMode::Driver), XdpAttached::Native),
            XdpMode::Generic => (prog.attach(ifname, aya::programs::XdpMode::Skb), XdpAttached::Generic),
            // A veth (a kind node's eth0, a container's uplink) takes a native program, but the
            // frames it transmits (XDP_TX, redirects) are dropped unless the peer, in another
            // namespace, runs XDP too: generic XDP unless asked for native.
            XdpMode::Auto | XdpMode::Tc if crate::node::devices::driver(ifname).as_deref() == Some("veth") => {
                info!(ifname, "veth: generic XDP (native XDP_TX needs an XDP program on the peer; --xdp-mode native)");
                (prog.attach(ifname, aya::programs::XdpMode::Skb), XdpAttached::Generic)
            }
            XdpMode::Auto | XdpMode::Tc => match prog.attach(ifname, aya::programs::XdpMode::Driver) {
                Ok(id) => (Ok(id), XdpAttached::Native),
                Err(e) => {
                    warn!(ifname, error = %describe(&e), "native XDP not available, using generic XDP");
                    (prog.attach(ifname, aya::programs::XdpMode::Skb), XdpAttached::Generic)
                }
            },
        };
        let id = id.map_err(|e| iface_err(format!("attaching {name} ({attached:?} XDP): {}", describe(&e))))?;
        if let Some(pin) = pin {
            let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
            let fd = FdLink::try_from(link)
                .map_err(|e| iface_err(format!("XDP link is not a bpf_link: {}", describe(&e))))?;
            fd.pin(&pin).map_err(|e| iface_err(format!("pinning {}: {}", pin.display(), describe(&e))))?;
        }
        info!(ifname, mode = ?attached, "XDP attached");
        Ok(attached)
    }

    fn attach_hook(&mut self, ifname: &str, hook: Hook) -> Result<()> {
        let pin = self.link_pin(ifname, hook);
        let name = hook.program();
        let prog = program_as::<SchedClassifier>(&mut self.ebpf, name)?;
        let iface_err = |reason: String| Error::Interface { name: ifname.to_owned(), reason };

        // A link pinned by an earlier run: swap our program into it.
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let replaced = PinnedLink::from_pin(pin)
                .map_err(|e| iface_err(format!("reading pinned link {}: {}", pin.display(), describe(&e))))
                .and_then(|pinned| {
                    SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| iface_err(format!("pinned link {}: {}", pin.display(), describe(&e))))
                })
                .and_then(|link| {
                    prog.attach_to_link(link)
                        .map_err(|e| iface_err(format!("replacing program in {}: {}", pin.display(), describe(&e))))
                });
            match replaced {
                Ok(id) => {
                    // The pin keeps the link; dropping our handle does not detach it.
                    drop(prog.take_link(id).map_err(|source| Error::Program { name, source })?);
                    debug!(ifname, hook = hook.dir(), "program replaced in pinned link");
                    return Ok(());
                }
                Err(e) => {
                    // Typically the device was deleted and re-created under the same name: the
                    // old link is defunct. Drop it and attach afresh.
                    debug!(ifname, error = %e, "stale pinned link, attaching a new one");
                    remove_pin(pin)?;
                }
            }
        }

        let id = prog
            .attach_with_options(ifname, hook.attach_type(), TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|e| iface_err(format!("attaching {name} ({}): {}", hook.dir(), describe(&e))))?;
        if let Some(pin) = pin {
            let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
            let fd =
                FdLink::try_from(link).map_err(|e| iface_err(format!("link is not a TCX link: {}", describe(&e))))?;
            fd.pin(&pin).map_err(|e| iface_err(format!("pinning {}: {}", pin.display(), describe(&e))))?;
        }
        info!(ifname, hook = hook.dir(), "attached");
        Ok(())
    }

    /// Sets the SNAT port range of north-south flows to remote backends (`--snat-port-range`).
    /// Before anything is attached: until then the programs SNAT nothing.
    pub fn set_snat_ports(&mut self, range: PortRange) -> Result<()> {
        self.update_config(|c| {
            c.snat_port_min = range.first;
            c.snat_port_max = range.last;
        })
    }

    /// Whether `ClusterIP` frontends take traffic arriving on the external devices
    /// (`--external-cluster-ip`).
    pub fn set_external_cluster_ip(&mut self, on: bool) -> Result<()> {
        self.update_config(|c| {
            c.flags = if on {
                c.flags | rproxy_common::CONFIG_F_EXTERNAL_CLUSTER_IP
            } else {
                c.flags & !rproxy_common::CONFIG_F_EXTERNAL_CLUSTER_IP
            };
        })
    }

    /// Makes `RPX_POD_NETNS` hold exactly `cookies` (`--pod-sockets <glob>`). Returns how many
    /// were added and removed.
    pub fn set_pod_netns(&mut self, cookies: &BTreeSet<u64>) -> Result<(usize, usize)> {
        let name = map_names::POD_NETNS;
        let err = |source| Error::Map { name, source };
        let map = self.ebpf.map_mut(name).ok_or(Error::MissingMap { name })?;
        let mut listed: HashMap<&mut MapData, u64, u32> = HashMap::try_from(map).map_err(err)?;
        let present: BTreeSet<u64> = listed.keys().collect::<Result<_, _>>().map_err(err)?;
        let (mut added, mut removed) = (0, 0);
        for gone in present.difference(cookies) {
            listed.remove(gone).map_err(err)?;
            removed += 1;
        }
        for new in cookies.difference(&present) {
            listed.insert(new, 0, 0).map_err(err)?;
            added += 1;
        }
        Ok((added, removed))
    }

    /// Changes `RPX_CONFIG[0]` with `f`.
    fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> Result<()> {
        let err = |source| Error::Map { name: map_names::CONFIG, source };
        let map = self.ebpf.map_mut(map_names::CONFIG).ok_or(Error::MissingMap { name: map_names::CONFIG })?;
        let mut config: Array<&mut MapData, Config> = Array::try_from(map).map_err(err)?;
        let mut value = config.get(&0, 0).map_err(err)?;
        f(&mut value);
        config.set(0, value, 0).map_err(err)
    }

    /// Translates service addresses for the sockets of this agent's network namespace
    /// (host-network processes) and, as `pods` says, pods' TCP connections: records the
    /// namespace's cookie and the pods' bits in `RPX_CONFIG`, then attaches the socket programs
    /// to cgroup v2 directory `cgroup` (normally the root: every process). Sockets of other
    /// namespaces are left alone by the programs. A restart attaches the new programs first and
    /// then unpins the old links, so no `connect` goes untranslated.
    pub fn attach_sockets(&mut self, cgroup: &Path, pods: &PodSockets) -> Result<()> {
        let cookie = netns_cookie()?;
        let bits = match pods {
            PodSockets::All => rproxy_common::CONFIG_F_POD_SOCKETS,
            PodSockets::Listed(_) => rproxy_common::CONFIG_F_POD_NETNS_LISTED,
            PodSockets::Off => 0,
        };
        let mask = rproxy_common::CONFIG_F_POD_SOCKETS | rproxy_common::CONFIG_F_POD_NETNS_LISTED;
        self.update_config(|c| {
            c.host_netns_cookie = cookie;
            c.flags = (c.flags & !mask) | bits;
        })?;
        let dir = std::fs::File::open(cgroup)
            .map_err(|source| Error::Io { what: format!("opening cgroup {}", cgroup.display()), source })?;
        let pins = self.pin_dir.as_ref().map(|d| d.join(LINKS_DIR).join(CGROUP_DIR));
        let interface = |reason: String| Error::Interface { name: cgroup.display().to_string(), reason };
        for name in SOCK_PROGRAMS {
            let prog = program_as::<CgroupSockAddr>(&mut self.ebpf, name)?;
            // With a bpf_link (Linux ≥ 5.7) the kernel refuses attach flags, and links are
            // always multi-attach: "Single" is aya's name for no flags.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| interface(format!("attaching {name}: {}", describe(&e))))?;
            let Some(pins) = &pins else { continue };
            let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
            let fd =
                FdLink::try_from(link).map_err(|e| interface(format!("{name}: not a bpf_link: {}", describe(&e))))?;
            replace_link_pin(fd, pins, name).map_err(interface)?;
        }
        if self.ebpf.program(prog_names::SOCK_RELEASE).is_some() {
            let name = prog_names::SOCK_RELEASE;
            let prog = program_as::<CgroupSock>(&mut self.ebpf, name)?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| interface(format!("attaching {name}: {}", describe(&e))))?;
            if let Some(pins) = &pins {
                let link = prog.take_link(id).map_err(|source| Error::Program { name, source })?;
                let fd = FdLink::try_from(link)
                    .map_err(|e| interface(format!("{name}: not a bpf_link: {}", describe(&e))))?;
                replace_link_pin(fd, pins, name).map_err(interface)?;
            }
        } else if let Some(pins) = &pins {
            // A downgrade to an object without it: the newer program goes.
            remove_pin(&pins.join(prog_names::SOCK_RELEASE))?;
        }
        info!(cgroup = %cgroup.display(), netns_cookie = cookie, pod_sockets = %pods, "socket hooks attached");
        Ok(())
    }

    /// Detaches both pod programs from `ifname` by removing their pinned links. Only meaningful
    /// with a pin directory (unpinned links go away with the process).
    pub fn detach_pinned(&self, ifname: &str) -> Result<()> {
        for hook in Hook::POD {
            if let Some(pin) = self.link_pin(ifname, hook) {
                remove_pin(&pin)?;
            }
        }
        Ok(())
    }

    /// Detaches the north-south programs (TC and XDP) from external device `ifname`.
    pub fn detach_external(&self, ifname: &str) -> Result<()> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        for hook in Hook::EXTERNAL {
            remove_pin(&dir.join(LINKS_DIR).join(hook.dir()).join(escape(ifname)))?;
        }
        remove_pin(&dir.join(LINKS_DIR).join(XDP_DIR).join(escape(ifname)))
    }

    /// External devices that have pinned links in this agent's directory.
    pub fn pinned_external_interfaces(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.pin_dir else { return Ok(Vec::new()) };
        let subs: Vec<&str> = Hook::EXTERNAL.iter().map(|h| h.dir()).chain([XDP_DIR]).collect();
        pinned_names(dir, &subs)
    }

    /// Pod interface names that have pinned links in this agent's directory.
    pub fn pinned_interfaces(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.pin_dir else { return Ok(Vec::new()) };
        pinned_interfaces(dir)
    }

    fn link_pin(&self, ifname: &str, hook: Hook) -> Option<PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join(LINKS_DIR).join(hook.dir()).join(escape(ifname)))
    }
}

/// Pins `link` as `dir/name` in place of the link pinned there (whose program it detaches):
/// pinned as `name-new` first, so the new program is attached before the old one goes.
fn replace_link_pin(link: FdLink, dir: &Path, name: &str) -> std::result::Result<(), String> {
    let (fresh, pin) = (dir.join(format!("{name}-new")), dir.join(name));
    remove_pin(&fresh).map_err(|e| e.to_string())?;
    link.pin(&fresh).map_err(|e| format!("pinning {}: {}", fresh.display(), describe(&e)))?;
    // Unpinning the old link detaches the previous run's program.
    remove_pin(&pin).map_err(|e| e.to_string())?;
    std::fs::rename(&fresh, &pin).map_err(|e| format!("renaming {}: {e}", fresh.display()))
}

/// Program `name` of the object as its type `T` (`SchedClassifier`, `Xdp`, `CgroupSockAddr`).
fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), what
/// `bpf_get_netns_cookie` returns for its sockets.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // The wildcard address: a namespace whose loopback is down has no 127.0.0.1 to bind.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .map_err(|source| Error::Io { what: String::from("opening a socket"), source })?;
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("8 fits");
    // SAFETY: valid socket fd, out-pointer to a u64 with its length.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(Error::Io {
            what: String::from("getsockopt(SO_NETNS_COOKIE)"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// The first cgroup v2 mount in `mountinfo` (the text of `/proc/self/mountinfo`).
#[must_use]
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mount-point options... - fstype source super-options
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Map `name` taken out of the object, as its typed handle (hash, array, LPM trie, …).
/// Takes program array `map` out of the object and puts each loaded program of `slots` in its
/// slot. On a restart the array is the pinned one the running programs call through: each slot
/// changes from the old program to the new in one update.
fn fill_calls(ebpf: &mut Ebpf, map: &'static str, slots: &[(u32, &'static str)]) -> Result<ProgramArray<MapData>> {
    let mut array: ProgramArray<MapData> = take(ebpf, map)?;
    for &(index, name) in slots {
        let program = ebpf.program(name).ok_or(Error::MissingProgram { name })?;
        let fd = program.fd().map_err(|source| Error::Program { name, source })?;
        array.set(index, fd, 0).map_err(|source| Error::Map { name: map, source })?;
    }
    Ok(array)
}

fn take<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<M> {
    let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    M::try_from(map).map_err(|source| Error::Map { name, source })
}

/// Pins only work on a bpffs mount. A common trap: `ip netns exec` mounts a fresh sysfs on /sys,
/// hiding the host's /sys/fs/bpf; start the agent with `nsenter --net=/run/netns/NAME` instead.
///
/// `dir` may not exist yet: the check applies to its nearest existing ancestor, where it would
/// be created.
/// A development build of the datapath (`RPROXY_EBPF_FEATURES=log`) writes aya-log records:
/// read on a thread of their own and logged through `log` (at debug level: `RPROXY_LOG=debug`).
/// The default build has no `AYA_LOGS` map, and nothing starts.
fn start_ebpf_log(ebpf: &mut Ebpf) {
    if ebpf.map("AYA_LOGS").is_none() {
        return;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(mut logger) => {
            info!("eBPF object with aya-log (a development build): its records are logged at debug level");
            let spawned = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || {
                loop {
                    super::monitor::wait_readable(&logger, std::time::Duration::from_secs(1));
                    logger.flush();
                }
            });
            if let Err(e) = spawned {
                warn!(error = %e, "aya-log records not read");
            }
        }
        Err(e) => warn!(error = %e, "aya-log records not read"),
    }
}

/// The pin directory is the agent's alone: its maps steer every Service's traffic. Made
/// `0700` (root only) at every start; one that held pins and was open to others is closed, with
/// a warning. The pins in it are `0600` (the kernel's mode for pins).
fn restrict(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta =
        std::fs::metadata(dir).map_err(|source| Error::Io { what: format!("reading {}", dir.display()), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 {
        // Said only of a directory that already held an agent's pins; a new one (made here, or by
        // an installer) is just tightened.
        if mode & 0o077 != 0 && dir.join(map_names::CONFIG).exists() {
            warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the pin directory was open to others: now 0700");
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| Error::Io { what: format!("making {} 0700", dir.display()), source })?;
    }
    Ok(())
}

fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("/"));
    let st = nix::sys::statfs::statfs(existing)
        .map_err(|e| Error::Io { what: format!("statfs {}", existing.display()), source: e.into() })?;
    if st.filesystem_type().0 != BPF_FS_MAGIC {
        return Err(Error::Io {
            what: format!("{} is not on a bpffs mount", dir.display()),
            source: io::Error::other(
                "mount one with `mount -t bpf bpf /sys/fs/bpf`; note that `ip netns exec` hides the host's \
                 /sys/fs/bpf (it remounts /sys): use `nsenter --net=/run/netns/NAME` to run the agent in a \
                 network namespace",
            ),
        });
    }
    Ok(())
}

/// Every entry of a hash map, read in chunks (`batch`), or key by key where the kernel has no
/// batch lookup. Entries that vanish during the walk are skipped.
#[must_use]
pub fn hash_entries<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    use std::os::fd::AsFd as _;

    use aya::maps::IterableMap as _;
    match super::batch::lookup_all::<K, V>(m.map().fd().as_fd(), || {}) {
        Ok(Some(all)) => return all,
        Ok(None) => {}
        Err(e) => debug!(error = %e, "batch lookup of a hash map failed; reading it key by key"),
    }
    m.iter().filter_map(std::result::Result::ok).collect()
}

/// The used entries of an id-indexed array (`RPX_BE4`, `RPX_RNAT4`): id 0 is never used and an
/// all-zero entry marks a free id.
#[must_use]
pub fn used_entries<V: aya::Pod + Default + PartialEq>(a: &Array<MapData, V>) -> Vec<(u32, V)> {
    use std::os::fd::AsFd as _;

    use aya::maps::IterableMap as _;
    let mut used = Vec::new();
    let keep = |i: u32, v: V| (i != 0 && v != V::default()).then_some((i, v));
    match super::batch::lookup_each::<u32, V>(a.map().fd().as_fd(), || {}, |i, v| used.extend(keep(i, v))) {
        Ok(Some(())) => return used,
        Ok(None) => {}
        Err(e) => debug!(error = %e, "batch lookup of an array failed; reading it index by index"),
    }
    used.clear();
    (1..a.len()).filter_map(|i| a.get(&i, 0).ok().and_then(|v| keep(i, v))).collect()
}

/// A counter of `RPX_STATS`, summed over CPUs (0 if it cannot be read).
#[must_use]
pub fn stat_total(stats: &PerCpuArray<MapData, u64>, stat: Stat) -> u64 {
    stats.get(&(stat as u32), 0).map_or(0, |v| v.iter().sum())
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io { what: format!("removing {}", path.display()), source }),
    }
}

/// Pin file name of an interface: bpffs refuses `.` in names.
fn escape(ifname: &str) -> String {
    ifname.replace('%', "%25").replace('.', "%2e")
}

fn unescape(pin: &str) -> String {
    pin.replace("%2e", ".").replace("%25", "%")
}

/// Pod interface names with pinned links under `dir`.
pub fn pinned_interfaces(dir: &Path) -> Result<Vec<String>> {
    let subs: Vec<&str> = Hook::POD.iter().map(|h| h.dir()).collect();
    pinned_names(dir, &subs)
}

fn pinned_names(dir: &Path, subs: &[&str]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for sub in subs {
        let links = dir.join(LINKS_DIR).join(sub);
        let entries = match std::fs::read_dir(&links) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Io { what: format!("reading {}", links.display()), source }),
        };
        names.extend(entries.filter_map(|e| Some(unescape(e.ok()?.file_name().to_str()?))));
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// An error with its chain of causes, for log lines (aya's errors put the errno in `source()`).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `rproxy-agent cleanup`: detaches every program this agent attached (by unpinning its links:
/// the kernel detaches a TCX link when its last reference goes) and removes its maps and
/// directory. Safe to run twice.
pub fn cleanup(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            info!(dir = %dir.display(), "removed pinned links and maps");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            info!(dir = %dir.display(), "nothing to clean up");
            Ok(())
        }
        Err(source) => Err(Error::Io { what: format!("removing {}", dir.display()), source }),
    }
}

/// What must agree between a map pinned by an earlier agent and this agent's definition of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// How `found` (pinned) differs from `self` (wanted), if it does.
    #[must_use]
    pub fn mismatch(&self, found: &Self) -> Option<String> {
        let fields = [
            ("type", self.map_type, found.map_type),
            ("key size", self.key_size, found.key_size),
            ("value size", self.value_size, found.value_size),
            ("max entries", self.max_entries, found.max_entries),
            ("flags", self.flags, found.flags),
        ];
        let diffs: Vec<String> = fields
            .iter()
            .filter(|(_, want, got)| want != got)
            .map(|(what, want, got)| format!("{what} {got}, needs {want}"))
            .collect();
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }
}

/// Maps that hold no connection state (counters, the SNAT cursor, the ICMP rate limit, the
/// filters and affinity matches, which the writer rewrites from the services and backends, the
/// configuration, which the agent writes at start, and the affinity memory, whose loss only
/// makes clients pick afresh, and the route cache, whose loss costs a FIB lookup, and the
/// program arrays, which the agent fills at every start, and the pods' namespaces, which it
/// lists at every start): a pinned one of another shape is replaced, not refused.
const REPLACEABLE: [&str; 15] = [
    map_names::STATS,
    map_names::SNAT_CURSOR,
    map_names::ICMP_LIMIT,
    map_names::SVC_FILTER,
    map_names::BE_FILTER,
    map_names::CONFIG,
    map_names::AFFINITY4,
    map_names::AFFINITY_MATCH,
    map_names::ROUTE4,
    map_names::CALLS_TC,
    map_names::CALLS_XDP,
    map_names::SVC_STATS,
    map_names::MONITOR,
    map_names::EVENTS,
    map_names::POD_NETNS,
];

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists (older agents' conntrack map).
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Refuses to start on maps pinned in `dir` whose shape differs from this agent's object (an
/// upgrade that changed a layout): reusing them would fail in the verifier with an obscure
/// message, or worse, run with the wrong map flags. Maps not pinned yet are created as usual,
/// and so are the `REPLACEABLE` ones after their old pin is removed. A resizable table of
/// another size passes: `migrate::set_aside` moves it to one of the wanted size.
fn check_pinned_maps(object: &aya_obj::Object, dir: &Path, sizes: MapSizes) -> Result<()> {
    for name in map_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = object.maps.get(name) else {
            // A map this object does not define: pinned by a newer agent, and this is a
            // downgrade (`--ebpf-object` with an older build). Stateless ones go (a later
            // upgrade creates them afresh rather than reading stale counters); state stays for
            // the agent that knows it.
            if REPLACEABLE.contains(&name) {
                info!(map = name, "unpinning a map this eBPF object does not define (pinned by a newer agent)");
                std::fs::remove_file(&path)
                    .map_err(|source| Error::Io { what: format!("unpinning {}", path.display()), source })?;
            } else {
                warn!(map = name, "a pinned map this eBPF object does not define is left as it is");
            }
            continue;
        };
        let info = MapData::from_pin(&path).and_then(|m| m.info()).map_err(|source| Error::Map { name, source })?;
        let want = MapShape {
            map_type: want.map_type(),
            key_size: want.key_size(),
            value_size: want.value_size(),
            // A table of another size moves to a new one of the wanted size (`migrate`).
            max_entries: if migrate::resizable(name) {
                info.max_entries()
            } else {
                sizes.of(name).unwrap_or_else(|| want.max_entries())
            },
            flags: want.map_flags(),
        };
        let found = MapShape {
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "bpf_map_type values")]
            map_type: info.map_type().map_or(u32::MAX, |t| t as isize as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        // The LRU list flavour changes only how fast inserts are: a map pinned with the other
        // one is kept (its connections with it) rather than refused.
        let lru_flavour = |s: MapShape| MapShape { flags: s.flags & !BPF_F_NO_COMMON_LRU, ..s };
        if let Some(detail) = lru_flavour(want).mismatch(&lru_flavour(found)) {
            // Counters and per-CPU scratch state are not worth a refusal: a new map replaces
            // the pinned one (the old programs keep theirs until the new ones replace them).
            if REPLACEABLE.contains(&name) {
                warn!(map = name, %detail, "replacing a pinned map of another shape (its contents start afresh)");
                std::fs::remove_file(&path)
                    .map_err(|source| Error::Io { what: format!("unpinning {}", path.display()), source })?;
                continue;
            }
            return Err(Error::PinnedMapMismatch { name, dir: dir.to_path_buf(), detail });
        }
        if want.flags != found.flags {
            warn!(map = name, pinned = found.flags, wanted = want.flags, "reusing a map pinned with other LRU flags");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let v1_only = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                       40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        let hybrid = format!("{v1_only}41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup2_mount(&hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn map_shape_mismatch_names_each_difference() {
        let want = MapShape { map_type: 9, key_size: 16, value_size: 32, max_entries: 1024, flags: 0 };
        assert_eq!(want.mismatch(&want), None);
        let old = MapShape { value_size: 24, flags: 2, ..want };
        assert_eq!(want.mismatch(&old).as_deref(), Some("value size 24, needs 32, flags 2, needs 0"));
    }

    #[test]
    fn pin_names_escape_dots() {
        for name in ["eth0", "eth0.100", "a%2eb", "%"] {
            assert_eq!(unescape(&escape(name)), name);
            assert!(!escape(name).contains('.'));
        }
    }
}

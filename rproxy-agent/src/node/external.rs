//! External devices (`--devices`): the north-south programs attached to each of them, kept
//! attached when a device is re-created, and removed from devices an earlier run served that
//! are no longer listed.
//!
//! Devices of other kinds than a NIC or a veth ([`decide`]): a VLAN, macvlan or other stacked
//! device has no native XDP, so `auto` picks generic XDP for it and `native` is refused with a
//! message naming the device and the modes that work; a bond in a mode without native XDP is
//! refused the same way; a port of a bond or bridge is refused (its frames, addresses and routes
//! are its master's, which is the device to list); a device that carries VLANs is warned about
//! ([`vlan_warning`]). A native attach that the kernel refuses on any other device is reported
//! the same way, and the device is left without programs rather than half served.
use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, error, info, warn};

use crate::{
    bpf::datapath::{Datapath, XdpAttached, XdpMode},
    node::devices::{self, Link},
};

/// Kinds of device (`IFLA_INFO_KIND`) whose drivers have no native XDP: stacked and virtual
/// devices, which take generic XDP and TC.
const NO_NATIVE_XDP: &[&str] = &[
    "vlan",
    "macvlan",
    "macvtap",
    "ipvlan",
    "ipvtap",
    "vxlan",
    "geneve",
    "bridge",
    "team",
    "wireguard",
    "gre",
    "gretap",
    "ip6gre",
    "ip6gretap",
    "ipip",
    "ip6tnl",
    "sit",
    "vrf",
    "dummy",
    "ifb",
    "bareudp",
];

/// Bonding modes by number (`IFLA_BOND_MODE`), and whether the bond driver runs native XDP in
/// them (it does in `active-backup`, `balance-xor` and `802.3ad`).
const BOND_MODES: [(&str, bool); 7] = [
    ("balance-rr", false),
    ("active-backup", true),
    ("balance-xor", true),
    ("broadcast", false),
    ("802.3ad", true),
    ("balance-tlb", false),
    ("balance-alb", false),
];

/// What to do with a listed device, given what netlink says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Attach in `mode`; `note`, when there is one, says why the mode differs from the one asked.
    Attach { mode: XdpMode, note: Option<String> },
    /// Do not attach; the message names the device and says what to do.
    Refuse(String),
}

/// Why device `dev` has no native XDP, if it has none for certain.
fn no_native_xdp(dev: &Link) -> Option<String> {
    let kind = dev.kind.as_deref()?;
    if NO_NATIVE_XDP.contains(&kind) {
        return Some(format!("a {kind} device"));
    }
    if kind == "bond" {
        let (name, native) = dev.bond_mode.and_then(|m| BOND_MODES.get(usize::from(m))).copied()?;
        if !native {
            return Some(format!(
                "a bond in mode {name} (the bonding driver runs native XDP only in active-backup, balance-xor and 802.3ad)"
            ));
        }
    }
    None
}

/// The policy for listed device `name` under `--xdp-mode requested`, from every interface's
/// [`Link`]. A device netlink does not show is attached as asked (its attach reports what is
/// wrong).
#[must_use]
pub fn decide(requested: XdpMode, name: &str, links: &[Link]) -> Decision {
    let as_asked = Decision::Attach { mode: requested, note: None };
    let Some(dev) = links.iter().find(|l| l.name == name) else { return as_asked };
    let by_index = |index: u32| links.iter().find(|l| l.index == index);
    if let Some(master) = dev.master.and_then(by_index) {
        let kind = master.kind.as_deref().unwrap_or("device");
        if matches!(kind, "bond" | "team" | "bridge") {
            return Decision::Refuse(format!(
                "{name} is a port of {kind} {master}: its frames, the node's addresses and routes are {master}'s; \
                 list {master} in --devices instead of {name}",
                master = master.name
            ));
        }
    }
    if let Some(reason) = no_native_xdp(dev) {
        return match requested {
            XdpMode::Native => Decision::Refuse(format!(
                "{name} is {reason}: its driver has no native XDP; use --xdp-mode generic (or auto, which picks \
                 generic XDP for it) or --xdp-mode tc"
            )),
            XdpMode::Auto => {
                Decision::Attach { mode: XdpMode::Generic, note: Some(format!("{name} is {reason}: generic XDP")) }
            }
            XdpMode::Generic | XdpMode::Tc => as_asked,
        };
    }
    // A bond of veths: as for a veth, native XDP_TX frames are dropped unless the peers run XDP.
    let ports: Vec<&Link> = links.iter().filter(|l| l.master == Some(dev.index)).collect();
    if requested == XdpMode::Auto
        && dev.kind.as_deref() == Some("bond")
        && !ports.is_empty()
        && ports.iter().all(|p| p.kind.as_deref() == Some("veth"))
    {
        return Decision::Attach {
            mode: XdpMode::Generic,
            note: Some(format!(
                "{name} is a bond of veths: generic XDP (native XDP_TX needs an XDP program on each veth's peer; \
                 --xdp-mode native)"
            )),
        };
    }
    as_asked
}

/// A warning for listed device `name` when VLAN devices sit on it: its TC programs pass tagged
/// skbs (`vlan_present`), but XDP sees a frame whose tag the NIC or the kernel already took off
/// as untagged, and may translate it.
#[must_use]
pub fn vlan_warning(name: &str, links: &[Link]) -> Option<String> {
    let dev = links.iter().find(|l| l.name == name)?;
    let vlans: Vec<&str> = links
        .iter()
        .filter(|l| l.lower == Some(dev.index) && l.kind.as_deref() == Some("vlan"))
        .map(|l| l.name.as_str())
        .collect();
    (!vlans.is_empty()).then(|| {
        format!(
            "{name} carries VLAN devices ({}): its TC programs pass their tagged frames, but XDP sees a frame whose \
             tag the NIC or the kernel already took off as untagged and may translate it; with --xdp-mode tc only \
             {name}'s own untagged traffic is served. List the VLAN devices that carry Service traffic in --devices",
            vlans.join(", ")
        )
    })
}

/// What a rescan must do with the external devices.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Listed, present, and new (or re-created with another ifindex).
    pub attach: Vec<(String, u32)>,
    /// Listed but absent: not served until they appear.
    pub missing: Vec<String>,
    /// Attached before, gone now.
    pub gone: Vec<String>,
    /// Pinned by an earlier run but not listed now: detach.
    pub unlisted: Vec<String>,
}

/// Pure planning: `present` interfaces (name → ifindex), the `listed` devices, those `attached`
/// by this run, and those with links `pinned` in the agent's directory.
#[must_use]
pub fn plan(
    present: &BTreeMap<String, u32>,
    listed: &[String],
    attached: &BTreeMap<String, u32>,
    pinned: &[String],
) -> Plan {
    let mut p = Plan::default();
    for name in listed {
        match present.get(name) {
            Some(idx) if attached.get(name) != Some(idx) => p.attach.push((name.clone(), *idx)),
            Some(_) => {}
            None => p.missing.push(name.clone()),
        }
    }
    p.gone = attached.keys().filter(|n| !present.contains_key(*n)).cloned().collect();
    p.unlisted = pinned.iter().filter(|n| !listed.contains(n)).cloned().collect();
    p
}

/// The external devices of this agent and where the programs are attached.
#[derive(Debug)]
pub struct External {
    devices: Vec<String>,
    mode: XdpMode,
    attached: BTreeMap<String, u32>,
    /// Devices already reported missing or failing (reported once until they change).
    reported: BTreeSet<String>,
    /// Devices whose native XDP attach the kernel refused (with their ifindex): not tried again
    /// until re-created.
    refused: BTreeMap<String, u32>,
    /// Devices whose VLANs were warned about.
    vlan_warned: BTreeSet<String>,
}

impl External {
    #[must_use]
    pub fn new(devices: Vec<String>, mode: XdpMode) -> Self {
        Self {
            devices,
            mode,
            attached: BTreeMap::new(),
            reported: BTreeSet::new(),
            refused: BTreeMap::new(),
            vlan_warned: BTreeSet::new(),
        }
    }

    /// Brings the attachments in line with the devices present.
    pub fn sync(&mut self, dp: &mut Datapath, present: &BTreeMap<String, u32>) {
        let pinned = dp.pinned_external_interfaces().unwrap_or_else(|e| {
            warn!(error = %e, "listing pinned links of external devices");
            Vec::new()
        });
        let p = plan(present, &self.devices, &self.attached, &pinned);
        for name in p.unlisted {
            match dp.detach_external(&name) {
                Ok(()) => info!(ifname = %name, "not an external device any more: detached"),
                Err(e) => warn!(ifname = %name, error = %e, "detaching a device no longer listed in --devices"),
            }
        }
        for name in p.gone {
            self.attached.remove(&name);
            warn!(ifname = %name, "external device gone; north-south traffic on it is not served until it returns");
        }
        // Missing devices are reported with the node addresses (run.rs).
        for name in p.missing {
            debug!(ifname = %name, "external device absent");
        }
        let attach: Vec<(String, u32)> =
            p.attach.into_iter().filter(|(name, idx)| self.refused.get(name) != Some(idx)).collect();
        if attach.is_empty() {
            return;
        }
        let links = devices::links().unwrap_or_else(|e| {
            warn!(error = %e, "reading the kinds of the external devices; attaching as --xdp-mode says");
            Vec::new()
        });
        for (name, idx) in attach {
            if let Some(message) = vlan_warning(&name, &links)
                && self.vlan_warned.insert(name.clone())
            {
                warn!(ifname = %name, "{message}");
            }
            let mode = match decide(self.mode, &name, &links) {
                Decision::Attach { mode, note } => {
                    if let Some(note) = note {
                        info!(ifname = %name, "{note}");
                    }
                    mode
                }
                Decision::Refuse(message) => {
                    if pinned.contains(&name)
                        && let Err(e) = dp.detach_external(&name)
                    {
                        warn!(ifname = %name, error = %e, "detaching what an earlier run attached");
                    }
                    if self.reported.insert(name.clone()) {
                        error!(ifname = %name, "external device not served: {message}");
                    }
                    continue;
                }
            };
            match dp.attach_external(&name, mode) {
                Ok(xdp) => {
                    self.reported.remove(&name);
                    self.refused.remove(&name);
                    self.attached.insert(name.clone(), idx);
                    let xdp = match xdp {
                        XdpAttached::Native => "native",
                        XdpAttached::Generic => "generic",
                        XdpAttached::Replaced => "kept (program replaced)",
                        XdpAttached::None => "none (TC)",
                    };
                    info!(ifname = %name, xdp, "external device attached");
                }
                Err(e) if mode == XdpMode::Native => {
                    // The TC programs went on before XDP failed: take them off, so that the
                    // device is not served half way while the log says it is not.
                    if let Err(e) = dp.detach_external(&name) {
                        warn!(ifname = %name, error = %e, "detaching after a failed native XDP attach");
                    }
                    self.refused.insert(name.clone(), idx);
                    error!(
                        ifname = %name, error = %e,
                        "external device not served: native XDP could not be attached to {name} (its driver may have \
                         no native XDP); use --xdp-mode generic, auto or tc"
                    );
                }
                Err(e) => {
                    if self.reported.insert(name.clone()) {
                        warn!(ifname = %name, error = %e, "attaching to external device failed; will retry");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn plans_attach_missing_gone_and_unlisted() {
        let present: BTreeMap<String, u32> = [("eth0".into(), 2), ("eth1".into(), 7)].into();
        let attached: BTreeMap<String, u32> = [("eth1".into(), 3), ("eth9".into(), 9)].into();
        let p = plan(&present, &s(&["eth0", "eth1", "bond0"]), &attached, &s(&["eth1", "eth5"]));
        assert_eq!(p.attach, vec![("eth0".into(), 2), ("eth1".into(), 7)], "new, and re-created eth1");
        assert_eq!(p.missing, s(&["bond0"]));
        assert_eq!(p.gone, s(&["eth9"]));
        assert_eq!(p.unlisted, s(&["eth5"]));
        let attached: BTreeMap<String, u32> = [("eth0".into(), 2), ("eth1".into(), 7)].into();
        assert_eq!(plan(&present, &s(&["eth0", "eth1"]), &attached, &s(&["eth0", "eth1"])), Plan::default());
    }

    fn link(name: &str, index: u32, kind: Option<&str>) -> Link {
        Link { name: name.into(), index, kind: kind.map(String::from), ..Link::default() }
    }

    /// A node with `eth0` (a NIC), VLAN `eth0.100` on it, a macvlan, and `bond0` over two veths.
    fn node_links() -> Vec<Link> {
        let mut bond = link("bond0", 5, Some("bond"));
        bond.bond_mode = Some(1);
        let mut vlan = link("eth0.100", 3, Some("vlan"));
        vlan.lower = Some(2);
        let mut macvlan = link("mv0", 4, Some("macvlan"));
        macvlan.lower = Some(2);
        let mut ports = [link("veth1", 6, Some("veth")), link("veth2", 7, Some("veth"))];
        for p in &mut ports {
            p.master = Some(5);
        }
        let mut all = vec![link("lo", 1, None), link("eth0", 2, None), vlan, macvlan, bond];
        all.extend(ports);
        all
    }

    fn attach(mode: XdpMode) -> Decision {
        Decision::Attach { mode, note: None }
    }

    #[test]
    fn stacked_devices_take_generic_xdp_or_tc_and_refuse_native() {
        let links = node_links();
        for dev in ["eth0.100", "mv0"] {
            let Decision::Refuse(msg) = decide(XdpMode::Native, dev, &links) else { panic!("{dev}: native accepted") };
            assert!(
                msg.starts_with(&format!("{dev} is a "))
                    && msg.contains("no native XDP")
                    && msg.contains("--xdp-mode generic")
                    && msg.contains("--xdp-mode tc"),
                "{msg}"
            );
            let Decision::Attach { mode: XdpMode::Generic, note: Some(note) } = decide(XdpMode::Auto, dev, &links)
            else {
                panic!("{dev}: auto did not pick generic XDP")
            };
            assert!(note.contains(dev) && note.contains("generic XDP"), "{note}");
            assert_eq!(decide(XdpMode::Generic, dev, &links), attach(XdpMode::Generic));
            assert_eq!(decide(XdpMode::Tc, dev, &links), attach(XdpMode::Tc));
        }
        // A NIC, and a device netlink does not show: as asked.
        for mode in [XdpMode::Auto, XdpMode::Native, XdpMode::Generic, XdpMode::Tc] {
            assert_eq!(decide(mode, "eth0", &links), attach(mode));
            assert_eq!(decide(mode, "eth9", &links), attach(mode));
        }
    }

    #[test]
    fn bonds_by_mode_and_ports() {
        let mut links = node_links();
        // active-backup over veths: native when asked, generic for auto (as on a veth).
        assert_eq!(decide(XdpMode::Native, "bond0", &links), attach(XdpMode::Native));
        assert!(matches!(
            decide(XdpMode::Auto, "bond0", &links),
            Decision::Attach { mode: XdpMode::Generic, note: Some(n) } if n.contains("bond of veths")
        ));
        // Over a NIC: as asked.
        links[5].kind = None;
        assert_eq!(decide(XdpMode::Auto, "bond0", &links), attach(XdpMode::Auto));
        // balance-rr has no native XDP.
        links[4].bond_mode = Some(0);
        let Decision::Refuse(msg) = decide(XdpMode::Native, "bond0", &links) else { panic!("balance-rr native") };
        assert!(msg.contains("bond0 is a bond in mode balance-rr") && msg.contains("--xdp-mode generic"), "{msg}");
        assert_eq!(decide(XdpMode::Generic, "bond0", &links), attach(XdpMode::Generic));
        for mode in [2, 4] {
            links[4].bond_mode = Some(mode);
            assert_eq!(decide(XdpMode::Native, "bond0", &links), attach(XdpMode::Native), "mode {mode}");
        }
        // A port of the bond (or of a bridge) is refused in every mode, naming its master.
        for mode in [XdpMode::Auto, XdpMode::Native, XdpMode::Generic, XdpMode::Tc] {
            let Decision::Refuse(msg) = decide(mode, "veth1", &links) else { panic!("bond port accepted") };
            assert!(msg.contains("veth1 is a port of bond bond0") && msg.contains("list bond0 in --devices"), "{msg}");
        }
        links[4].kind = Some("bridge".into());
        assert!(
            matches!(decide(XdpMode::Tc, "veth2", &links), Decision::Refuse(m) if m.contains("port of bridge bond0"))
        );
    }

    #[test]
    fn a_device_carrying_vlans_is_warned_about() {
        let links = node_links();
        let warning = vlan_warning("eth0", &links).unwrap();
        assert!(warning.starts_with("eth0 carries VLAN devices (eth0.100)") && !warning.contains("mv0"), "{warning}");
        assert_eq!(vlan_warning("eth0.100", &links), None);
        assert_eq!(vlan_warning("bond0", &links), None);
        assert_eq!(vlan_warning("eth9", &links), None);
    }
}

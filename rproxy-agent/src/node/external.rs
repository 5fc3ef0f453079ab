//! External devices (`--devices`): the north-south programs attached to each of them, kept
//! attached when a device is re-created, and removed from devices an earlier run served that
//! are no longer listed.
use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, info, warn};

use crate::bpf::datapath::{Datapath, XdpAttached, XdpMode};

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
}

impl External {
    #[must_use]
    pub fn new(devices: Vec<String>, mode: XdpMode) -> Self {
        Self { devices, mode, attached: BTreeMap::new(), reported: BTreeSet::new() }
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
        for (name, idx) in p.attach {
            match dp.attach_external(&name, self.mode) {
                Ok(xdp) => {
                    self.reported.remove(&name);
                    self.attached.insert(name.clone(), idx);
                    let xdp = match xdp {
                        XdpAttached::Native => "native",
                        XdpAttached::Generic => "generic",
                        XdpAttached::Replaced => "kept (program replaced)",
                        XdpAttached::None => "none (TC)",
                    };
                    info!(ifname = %name, xdp, "external device attached");
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
}

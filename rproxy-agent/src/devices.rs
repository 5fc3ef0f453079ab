//! Pod devices: which interfaces get the programs, and noticing when they come and go.
//!
//! A netlink socket subscribed to link notifications (`RTNLGRP_LINK`) wakes the agent whenever an
//! interface appears, changes or disappears; the agent then rescans the interface list and
//! attaches to every new device matching `--pod-devices`. A periodic rescan covers a missed
//! notification (socket buffer overrun).
use std::collections::BTreeMap;

use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{Error, Result};

/// `--pod-devices`: one or more comma-separated globs over interface names.
#[derive(Clone, Debug)]
pub struct DevicePattern {
    set: GlobSet,
    text: String,
}

impl DevicePattern {
    pub fn parse(text: &str) -> Result<Self> {
        let mut b = GlobSetBuilder::new();
        let mut any = false;
        for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            b.add(Glob::new(p).map_err(|source| Error::Glob { pattern: p.to_owned(), source })?);
            any = true;
        }
        if !any {
            return Err(Error::Interface {
                name: text.to_owned(),
                reason: String::from("empty --pod-devices pattern"),
            });
        }
        let set = b.build().map_err(|source| Error::Glob { pattern: text.to_owned(), source })?;
        Ok(Self { set, text: text.to_owned() })
    }

    #[must_use]
    pub fn matches(&self, ifname: &str) -> bool {
        self.set.is_match(ifname)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Interfaces of this network namespace: name → ifindex.
pub fn interfaces() -> Result<BTreeMap<String, u32>> {
    let list = nix::net::if_::if_nameindex()
        .map_err(|e| Error::Io { what: String::from("listing interfaces"), source: std::io::Error::from(e) })?;
    Ok(list.iter().filter_map(|i| Some((i.name().to_str().ok()?.to_owned(), i.index()))).collect())
}

/// What a rescan must do, given the interfaces present, those attached, and the pattern.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Attach (new device, or same name with a new ifindex).
    pub attach: Vec<(String, u32)>,
    /// Forget and unpin (device gone).
    pub detach: Vec<String>,
}

#[must_use]
pub fn plan(present: &BTreeMap<String, u32>, attached: &BTreeMap<String, u32>, pattern: &DevicePattern) -> Plan {
    let attach = present
        .iter()
        .filter(|(name, idx)| pattern.matches(name) && attached.get(*name) != Some(idx))
        .map(|(n, i)| (n.clone(), *i))
        .collect();
    let detach = attached.keys().filter(|n| !present.contains_key(*n)).cloned().collect();
    Plan { attach, detach }
}

/// Starts a thread that sends `()` on `tx` for every burst of link notifications. The channel
/// has capacity 1: notifications arriving while a rescan is pending coalesce into it.
pub fn watch_links(tx: mpsc::Sender<()>) -> Result<()> {
    use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
    const RTNLGRP_LINK: u32 = 1;
    let watch_err =
        |e: std::io::Error| Error::Watch { what: String::from("netlink link notifications"), reason: e.to_string() };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(watch_err)?;
    sock.bind_auto().map_err(watch_err)?;
    sock.add_membership(RTNLGRP_LINK).map_err(watch_err)?;
    std::thread::Builder::new()
        .name(String::from("link-watch"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sock.recv(&mut &mut buf[..], 0) {
                    Ok(_) => {}
                    // ENOBUFS: we missed notifications; a rescan sees the current state anyway.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => debug!("netlink overrun"),
                    Err(e) => {
                        warn!(error = %e, "netlink link watch failed; relying on periodic rescans");
                        return;
                    }
                }
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .map_err(watch_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(items: &[(&str, u32)]) -> BTreeMap<String, u32> {
        items.iter().map(|(n, i)| ((*n).to_owned(), *i)).collect()
    }

    #[test]
    fn patterns() {
        let p = DevicePattern::parse("veth*, lxc*").unwrap();
        assert!(p.matches("veth1234") && p.matches("lxc0") && !p.matches("eth0"));
        assert!(DevicePattern::parse("").is_err());
        assert!(DevicePattern::parse("a[").is_err());
    }

    #[test]
    fn rescan_plans() {
        let p = DevicePattern::parse("rpx*").unwrap();
        let present = ifs(&[("lo", 1), ("eth0", 2), ("rpxa", 5), ("rpxb", 6)]);
        let attached = ifs(&[("rpxa", 5), ("rpxgone", 4)]);
        let plan = plan(&present, &attached, &p);
        assert_eq!(plan.attach, vec![(String::from("rpxb"), 6)]);
        assert_eq!(plan.detach, vec![String::from("rpxgone")]);
        // Same name, new ifindex (pod re-created): attach again.
        let plan2 = super::plan(&ifs(&[("rpxa", 9)]), &ifs(&[("rpxa", 5)]), &p);
        assert_eq!(plan2.attach, vec![(String::from("rpxa"), 9)]);
    }
}

//! Named network namespaces (`/run/netns/<name>`, as `ip netns` makes them) and running code
//! inside one from this process.
//!
//! The network namespace is per thread: [`in_netns`] runs a closure on a fresh thread that has
//! joined the namespace. Sockets created there stay in that namespace after the thread ends, so
//! a closure may bind a socket and hand it back to be used from any thread.
use std::{collections::BTreeMap, fs::File, path::Path, process::Command, thread};

use anyhow::{Context as _, Result};
use nix::sched::{CloneFlags, setns};

use crate::cmd::{ip, run};

/// Runs `f` on a thread that has joined network namespace `ns` and returns its result. A panic
/// in `f` is propagated.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({}) failed", path.display()))
                .map(|()| f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes `value` to `/proc/sys/<key>` (`key` like `net/ipv4/ip_forward`) inside `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    in_netns(ns, || std::fs::write(&path, value))?
        .with_context(|| format!("cannot write {value} to {} in netns {ns}", path.display()))
}

/// The MAC address of device `ifname` in namespace `ns`.
pub fn mac_address(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let found = in_netns(ns, || -> Result<Option<[u8; 6]>> {
        let addrs = nix::ifaddrs::getifaddrs().context("getifaddrs")?;
        Ok(addrs
            .filter(|a| a.interface_name == ifname)
            .find_map(|a| a.address.as_ref().and_then(|s| s.as_link_addr()).and_then(nix::sys::socket::LinkAddr::addr)))
    })??;
    found.with_context(|| format!("no MAC address for {ifname} in netns {ns}"))
}

/// `ethtool -S <dev>` in namespace `ns`: the device's statistics by name.
pub fn ethtool_stats(ns: &str, dev: &str) -> Result<BTreeMap<String, u64>> {
    Ok(parse_ethtool_stats(&run(command(ns, "ethtool").args(["-S", dev]))?))
}

/// The `name: value` lines of `ethtool -S` output (the header line has no value).
#[must_use]
pub fn parse_ethtool_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(name, value)| Some((name.trim().to_owned(), value.trim().parse().ok()?)))
        .collect()
}

/// `nsenter --net=/run/netns/<ns> -- <program>`: a command that runs `program` in network
/// namespace `ns` and changes nothing else. Unlike `ip netns exec`, it leaves the mount namespace
/// alone, so `/sys/fs/bpf` stays the host's bpffs. `nsenter` execs `program`, so the child's pid
/// is the program's.
#[must_use]
pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
    cmd
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` with loopback up. A stale namespace of the same name (left by a
    /// killed run) is deleted first.
    pub fn create(name: &str) -> Result<Self> {
        if Path::new("/run/netns").join(name).exists() {
            eprintln!("rproxy-tests: deleting stale netns {name}");
            ip(None, &["netns", "del", name])?;
        }
        ip(None, &["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ip(Some(name), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec <name>` / `ip -n <name>`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(None, &["netns", "del", &self.name]) {
            eprintln!("rproxy-tests: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethtool_stats_are_read_by_name() {
        let text =
            "NIC statistics:\n     peer_ifindex: 3\n     rx_queue_0_xdp_packets: 292496\n     rx_queue_1_xdp_tx: 7\n";
        let stats = parse_ethtool_stats(text);
        assert_eq!(stats.len(), 3);
        assert_eq!(stats["rx_queue_0_xdp_packets"], 292_496);
        assert_eq!(stats["rx_queue_1_xdp_tx"], 7);
    }
}

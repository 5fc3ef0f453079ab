//! `--snat-port-range`: the source ports north-south flows to remote backends are translated
//! to (see `rproxy_common::snat` for why the range is wide and where its default lies), and the
//! check that the node's own connections cannot take them.
//!
//! The kernel picks the node's ephemeral ports from `net.ipv4.ip_local_port_range`, skipping
//! `net.ipv4.ip_local_reserved_ports`, and knows nothing of the ports the datapath hands out. A
//! node connection and a translated flow on the same port to the same backend would be one TCP
//! connection to the backend, and the datapath would take the node connection's replies. So the
//! agent refuses a SNAT range with ports the kernel may pick. It does not change the sysctls
//! itself: the administrator chooses between a narrower ephemeral range and reserved ports.
use std::{fmt, ops::RangeInclusive, path::Path, str::FromStr};

use rproxy_common::snat;

use crate::{Error, Result};

/// An inclusive port range, `first-last` (or one port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const DEFAULT: Self = Self { first: snat::DEFAULT_PORT_MIN, last: snat::DEFAULT_PORT_MAX };

    #[must_use]
    pub fn port_count(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    #[must_use]
    pub fn ports(self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    /// The ports in both ranges, if any.
    #[must_use]
    pub fn intersection(self, other: Self) -> Option<Self> {
        let (first, last) = (self.first.max(other.first), self.last.min(other.last));
        (first <= last).then_some(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

/// Parses `first-last` or a single port (the format of `ip_local_reserved_ports` entries); no
/// bounds beyond `first <= last`.
fn parse_range(s: &str) -> Result<PortRange, String> {
    let s = s.trim();
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("'{p}': {e}"));
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(s)?, port(s)?),
    };
    if first > last {
        return Err(format!("'{s}': the first port is above the last"));
    }
    Ok(PortRange { first, last })
}

/// `--snat-port-range`: `MIN-MAX`, `snat::PORT_FLOOR <= MIN <= MAX <= 65535`.
impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('-') {
            return Err(format!("'{s}': expected MIN-MAX"));
        }
        let range = parse_range(s)?;
        if range.first < snat::PORT_FLOOR {
            return Err(format!(
                "'{s}': ports below {} are privileged ports that clients bind explicitly",
                snat::PORT_FLOOR
            ));
        }
        Ok(range)
    }
}

/// `net.ipv4.ip_local_port_range`: two numbers separated by white space.
fn parse_local_port_range(text: &str) -> Result<PortRange, String> {
    let mut it = text.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) => parse_range(&format!("{a}-{b}")),
        _ => Err(format!("'{}': expected two ports", text.trim())),
    }
}

/// `net.ipv4.ip_local_reserved_ports`: comma-separated ports and ranges, possibly empty.
fn parse_reserved_ports(text: &str) -> Result<Vec<PortRange>, String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(parse_range).collect()
}

/// The first stretch of `snat` ports that the kernel may pick as ephemeral ports: inside
/// `ephemeral` and not `reserved`. `None`: the ranges are disjoint, or the overlap is reserved.
#[must_use]
pub fn unreserved_overlap(snat: PortRange, ephemeral: PortRange, reserved: &[PortRange]) -> Option<PortRange> {
    let overlap = snat.intersection(ephemeral)?;
    let mut first = overlap.first;
    loop {
        // Skip the reserved stretch holding `first`, if any.
        let Some(end) = reserved.iter().filter(|r| r.ports().contains(&first)).map(|r| r.last).max() else {
            // `first` is free: the stretch runs to the next reserved port or the overlap's end.
            let next = reserved.iter().map(|r| r.first).filter(|&f| f > first && f <= overlap.last).min();
            return Some(PortRange { first, last: next.map_or(overlap.last, |n| n - 1) });
        };
        if end >= overlap.last {
            return None;
        }
        first = end + 1;
    }
}

/// Refuses `range` if the kernel may give its ports to the node's own connections (see the
/// module doc), reading the sysctls of the calling thread's network namespace under `proc_sys`
/// (normally `/proc/sys`).
pub fn check_node_ports(range: PortRange, proc_sys: &Path) -> Result<()> {
    let read = |name: &str| {
        let path = proc_sys.join("net/ipv4").join(name);
        std::fs::read_to_string(&path)
            .map_err(|source| Error::Io { what: format!("reading {}", path.display()), source })
    };
    let invalid = |name: &str, reason: String| Error::SnatPortRange { range, reason: format!("{name}: {reason}") };
    let ephemeral = parse_local_port_range(&read("ip_local_port_range")?)
        .map_err(|r| invalid("net.ipv4.ip_local_port_range", r))?;
    let reserved = parse_reserved_ports(&read("ip_local_reserved_ports")?)
        .map_err(|r| invalid("net.ipv4.ip_local_reserved_ports", r))?;
    match unreserved_overlap(range, ephemeral, &reserved) {
        None => Ok(()),
        Some(clash) => Err(Error::SnatPortRange {
            range,
            reason: format!(
                "ports {clash} are also the node's ephemeral ports (net.ipv4.ip_local_port_range {} {}) and are \
                 not in net.ipv4.ip_local_reserved_ports: the node's own connections could take a SNATed flow's \
                 tuple. Choose a range outside {ephemeral}, or reserve it (sysctl -w \
                 net.ipv4.ip_local_reserved_ports={range})",
                ephemeral.first, ephemeral.last
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!("1024-29999".parse(), Ok(PortRange::DEFAULT));
        assert_eq!(" 40000 - 40015 ".parse(), Ok(r(40000, 40015)));
        assert_eq!("65535-65535".parse(), Ok(r(65535, 65535)));
        for (bad, why) in [
            ("30000", "expected MIN-MAX"),
            ("2000-1999", "first port is above the last"),
            ("1000-2000", "privileged"),
            ("1024-65536", "'65536'"),
            ("a-b", "'a'"),
            ("-", "''"),
        ] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(PortRange::DEFAULT.port_count(), 28_976);
        assert_eq!(r(7, 7).port_count(), 1);
        assert_eq!(r(1024, 65535).port_count(), 64_512);
        assert_eq!(r(40000, 40015).to_string(), "40000-40015");
        assert_eq!(r(8080, 8080).to_string(), "8080");
    }

    #[test]
    fn parses_the_sysctls() {
        assert_eq!(parse_local_port_range("32768\t60999\n"), Ok(r(32768, 60999)));
        assert!(parse_local_port_range("32768").is_err());
        assert!(parse_local_port_range("32768 60999 1").is_err());
        assert_eq!(parse_reserved_ports("\n"), Ok(vec![]));
        assert_eq!(parse_reserved_ports("8080,9000-9100\n"), Ok(vec![r(8080, 8080), r(9000, 9100)]));
        assert!(parse_reserved_ports("80,x").is_err());
    }

    #[test]
    fn overlap_not_covered_by_reserved_ports() {
        let default_ephemeral = r(32768, 60999);
        // The default SNAT range and the kernel's default ephemeral range are disjoint.
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, default_ephemeral, &[]), None);
        assert_eq!(unreserved_overlap(r(61000, 65535), default_ephemeral, &[]), None);
        // A widened ephemeral range clashes, from its first port on.
        let wide = r(1024, 65535);
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[]), Some(PortRange::DEFAULT));
        assert_eq!(unreserved_overlap(r(20000, 40000), default_ephemeral, &[]), Some(r(32768, 40000)));
        // Reserved ports cover the overlap: accepted.
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(1024, 29999)]), None);
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(1000, 20000), r(15000, 30000)]), None);
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(80, 80), r(1024, 29999), r(40000, 40000)]), None);
        // Partly: the first unreserved stretch is named.
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(1024, 5000)]), Some(r(5001, 29999)));
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(2000, 3000)]), Some(r(1024, 1999)));
        assert_eq!(unreserved_overlap(PortRange::DEFAULT, wide, &[r(1024, 3000), r(4000, 29999)]), Some(r(3001, 3999)));
        assert_eq!(unreserved_overlap(r(5000, 5000), wide, &[r(5000, 5000)]), None);
        assert_eq!(unreserved_overlap(r(5000, 5001), wide, &[r(5000, 5000)]), Some(r(5001, 5001)));
    }

    #[test]
    fn check_reads_the_sysctls_and_names_the_clash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ipv4 = dir.join("net/ipv4");
        std::fs::create_dir_all(&ipv4).unwrap();
        let write = |name: &str, text: &str| std::fs::write(ipv4.join(name), text).unwrap();
        write("ip_local_port_range", "32768\t60999\n");
        write("ip_local_reserved_ports", "\n");
        let check = |range: &str| check_node_ports(range.parse().unwrap(), dir);
        assert!(check("1024-29999").is_ok());
        let err = check("30000-33000").unwrap_err().to_string();
        assert!(err.contains("--snat-port-range 30000-33000") && err.contains("ports 32768-33000"), "{err}");
        assert!(err.contains("ip_local_port_range 32768 60999") && err.contains("ip_local_reserved_ports=30000-33000"));
        write("ip_local_reserved_ports", "32768-33000\n");
        assert!(check("30000-33000").is_ok());
        write("ip_local_port_range", "nonsense\n");
        let err = check("1024-29999").unwrap_err().to_string();
        assert!(err.contains("net.ipv4.ip_local_port_range: 'nonsense'"), "{err}");
    }
}

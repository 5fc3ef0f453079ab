//! rproxy's `XDP_PASS` program (`rpx_xdp_noop`) in the labs, loaded from the agent's embedded
//! object ([`rproxy_agent::bpf::datapath`]) with private maps: nothing is pinned, and nothing outlives
//! the process.
//!
//! Two uses: attached in driver mode to the bridge side of the two-node lab's veths, where it
//! makes veth run NAPI (see [`crate::cluster`]); and as the program that
//! [`crate::pktgen::LiveFrames`] runs to inject frames. [`attached_program`] opens another
//! process's XDP program (an agent's) for the same generator.
use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use aya::programs::{Xdp, XdpMode, xdp::XdpLink};
use aya_obj::programs::XdpAttachType;
use rproxy_agent::bpf::datapath::Datapath;
use rproxy_common::prog_names;

use crate::{
    cmd::{ip, run},
    netns::in_netns,
};

/// The loaded object, for its `rpx_xdp_noop` (which returns `XDP_PASS` at once).
pub struct PassProgram {
    datapath: Datapath,
}

impl std::fmt::Debug for PassProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(prog_names::XDP_NOOP)
    }
}

impl PassProgram {
    /// Loads rproxy's eBPF object (every program verified, maps private to this process).
    pub fn load() -> Result<Self> {
        let datapath = Datapath::load(None).context("loading rproxy's eBPF object")?;
        Ok(Self { datapath })
    }

    /// The loaded `rpx_xdp_noop`.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        self.datapath.xdp_program(prog_names::XDP_NOOP).with_context(|| format!("no {}", prog_names::XDP_NOOP))
    }

    /// Attaches the program in driver (native) mode to device `ifname` of namespace `ns`. The
    /// link detaches when dropped, or when the device is deleted.
    pub fn attach_native(&mut self, ns: &str, ifname: &str) -> Result<XdpLink> {
        let prog = self.program()?;
        let id = in_netns(ns, || prog.attach(ifname, XdpMode::Driver))?
            .with_context(|| format!("attaching {} to {ifname} in netns {ns} (driver mode)", prog_names::XDP_NOOP))?;
        prog.take_link(id).context("taking the XDP link")
    }
}

/// The XDP program attached to device `ifname` of namespace `ns` (whoever attached it), opened
/// through a pin at `pin` (a free path on a bpffs) that is removed again at once. Used to run an
/// agent's own XDP program, with its maps, as the generator's program.
pub fn attached_program(ns: &str, ifname: &str, pin: &Path) -> Result<Xdp> {
    let json = ip(Some(ns), &["-j", "link", "show", "dev", ifname])?;
    let id = attached_program_id(&json).with_context(|| format!("no XDP program on {ifname} in netns {ns}"))?;
    ensure!(!pin.exists(), "{} exists", pin.display());
    run(std::process::Command::new("bpftool").args(["prog", "pin", "id", &id.to_string()]).arg(pin))?;
    let prog = Xdp::from_pin(pin, XdpAttachType::Interface);
    std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    prog.with_context(|| format!("opening XDP program {id} of {ifname} in netns {ns}"))
}

/// The id of the XDP program in `ip -j link show dev <dev>` output: `xdp.prog.id`, or the first
/// of `xdp.attached` when several modes are attached.
fn attached_program_id(json: &str) -> Option<u64> {
    let links: serde_json::Value = serde_json::from_str(json).ok()?;
    let xdp = links.get(0)?.get("xdp")?;
    let prog = xdp.get("prog").or_else(|| xdp.get("attached")?.get(0)?.get("prog"))?;
    prog.get("id")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_program_id_reads_ip_link_json() {
        let one = r#"[{"ifindex":2,"ifname":"eth0","xdp":{"mode":1,"prog":{"id":42,"name":"rpx_xdp","tag":"ab","jited":1}}}]"#;
        assert_eq!(attached_program_id(one), Some(42));
        let multi =
            r#"[{"ifindex":2,"xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":7}},{"mode":2,"prog":{"id":8}}]}}]"#;
        assert_eq!(attached_program_id(multi), Some(7));
        assert_eq!(attached_program_id(r#"[{"ifindex":2,"ifname":"eth0"}]"#), None);
        assert_eq!(attached_program_id("not json"), None);
    }
}

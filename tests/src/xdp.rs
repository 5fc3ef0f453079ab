//! rproxy's `XDP_PASS` program (`rpx_xdp_noop`) in the labs, loaded from the agent's embedded
//! object ([`rproxy_agent::datapath`]) with private maps: nothing is pinned, and nothing outlives
//! the process.
//!
//! Two uses: attached in driver mode to the bridge side of the two-node lab's veths, where it
//! makes veth run NAPI (see [`crate::cluster`]); and as the program that
//! [`crate::pktgen::LiveFrames`] runs to inject frames.
use anyhow::{Context as _, Result};
use aya::programs::{Xdp, XdpMode, xdp::XdpLink};
use rproxy_agent::datapath::Datapath;
use rproxy_common::prog_names;

use crate::netns::in_netns;

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

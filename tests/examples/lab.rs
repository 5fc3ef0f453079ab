//! The interactive lab without xtask: `cargo run -p rproxy-tests --example lab [-- MANIFESTS_DIR]`
//! (as root). The agent binary comes from `rproxy_tests::agent_bin` (`$RPROXY_AGENT_BIN`, else
//! the workspace's target dir); the manifests default to `lab/manifests`.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifests =
        std::env::args_os().nth(1).map_or_else(|| rproxy_tests::workspace_root().join("lab/manifests"), PathBuf::from);
    rproxy_tests::run_interactive(&rproxy_tests::agent_bin()?, &manifests)
}

//! The agent's one error type.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading manifests directory {path}: {source}")]
    ManifestsDir { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A command line that cannot be acted on.
    #[error("{0}")]
    Usage(String),
    #[error("loading eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error(
        "map {name} pinned in {dir} does not fit this agent ({detail}): it was made by another \
         rproxy version. Start that version, or \
         run `rproxy-agent cleanup --bpffs {dir}` once and start again (connections through this \
         node are dropped)"
    )]
    PinnedMapMismatch { name: &'static str, dir: PathBuf, detail: String },
    #[error(
        "map {name} pinned in {dir} cannot shrink to {size} entries: {detail}. Start with a size \
         that holds it (--service-map-max, --backend-map-max), or with fewer Services"
    )]
    MapTooSmall { name: &'static str, dir: PathBuf, size: u32, detail: String },
    #[error("parsing the embedded eBPF object: {0}")]
    Object(String),
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error("invalid --pod-devices pattern {pattern:?}: {source}")]
    Glob { pattern: String, source: globset::Error },
    #[error("invalid --nodeport-addresses entry {value:?}: {reason}")]
    Cidr { value: String, reason: String },
    #[error("watching {what}: {reason}")]
    Watch { what: String, reason: String },
    #[error("{0}")]
    Capacity(String),
    #[error("--snat-port-range {range}: {reason}")]
    SnatPortRange { range: crate::node::snat::PortRange, reason: String },
    /// Building the Kubernetes API client failed: `what` names the step (reading a kubeconfig,
    /// inferring the configuration, creating the client).
    #[error("Kubernetes client: {what}: {source}")]
    KubeClient { what: String, source: Box<dyn std::error::Error + Send + Sync> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

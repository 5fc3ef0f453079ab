//! `rproxy-agent`: turns Kubernetes Services and `EndpointSlices` into rproxy's BPF maps, attaches
//! the eBPF programs and keeps both right.
//!
//! Pipeline: sources (`manifests`, `kube_source`) → pure translation (`translate`, into
//! `model::Desired`) → map writer → attach and lifecycle.
pub mod datapath;
pub mod devices;
pub mod dump;
pub mod error;
pub mod external;
pub mod gc;
pub mod healthcheck;
pub mod kube_source;
pub mod manifests;
pub mod model;
pub mod proxy_health;
pub mod run;
pub mod slim;
pub mod snat;
pub mod source;
pub mod store;
pub mod translate;
pub mod writer;

pub use error::{Error, Result};

//! rproxy-agent: turns Kubernetes Services and EndpointSlices into rproxy's BPF maps, attaches
//! the eBPF programs and keeps both right.
//!
//! Pipeline: sources (`manifests`) → pure translation (`translate`, into `model::Desired`) →
//! map writer → attach and lifecycle.
pub mod error;
pub mod model;

pub use error::{Error, Result};

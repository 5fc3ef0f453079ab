//! `rproxy-agent`: turns Kubernetes Services and `EndpointSlices` into rproxy's BPF maps, attaches
//! the eBPF programs and keeps both right.
//!
//! The pipeline, one module per stage: `source` (the manifests directory or the Kubernetes API)
//! → `store` (the objects, and what changed) → `translate` (pure: objects to `model::Desired`)
//! → `writer` (the maps made to hold it, in a safe order) → `bpf` (the object, pins, programs,
//! conntrack GC); around them `node` (devices and addresses), `health` (kube-proxy's health
//! endpoints) and `run` (the event loop that ties them together).
pub mod bpf;
pub mod error;
pub mod health;
pub mod metrics;
pub mod model;
pub mod node;
pub mod run;
pub mod source;
pub mod store;
pub mod translate;
pub mod writer;

pub use error::{Error, Result};

//! Tests that need neither root nor a kernel feature, one test binary: `deploy` (the `deploy/`
//! manifests against the Kubernetes API types and the agent's command line) and `manifests`
//! (the lab's manifest renderer and demo objects).
mod deploy;
mod manifests;

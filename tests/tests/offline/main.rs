//! Tests that need neither root nor a kernel feature, one test binary: `deploy` (the `deploy/`
//! manifests against the Kubernetes API types and the agent's command line), `helm` (the Helm
//! chart in deploy/helm/rproxy with a real helm: lint, its default rendering against `deploy/`,
//! other values) and `manifests` (the lab's manifest renderer and demo objects).
mod deploy;
mod helm;
mod manifests;

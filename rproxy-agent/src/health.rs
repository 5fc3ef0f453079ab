//! Health, as kube-proxy reports it: the agent's own (`/healthz`, `/livez`: `proxy`), and the
//! health check node ports of `LoadBalancer` Services with `externalTrafficPolicy: Local`
//! (`service`), both served by the same small HTTP server (`http`).
pub mod http;
pub mod proxy;
pub mod service;

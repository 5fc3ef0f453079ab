//! End to end on the one-node netns lab (`rproxy_tests::Lab`, `rproxy_tests::demo`), one test
//! binary: `e2e` (translation, restarts, pods coming and going, dual-stack) and `semantics`
//! (Service semantics as Kubernetes defines them).
mod e2e;
mod semantics;

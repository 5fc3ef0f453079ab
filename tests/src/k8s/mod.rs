//! A real Kubernetes control plane for the lab and the tests: kube-apiserver, etcd,
//! kube-controller-manager and kube-scheduler built from their Go modules (`tests/k8s`,
//! `scripts/build-k8s.sh`), netns nodes and a lab kubelet.
pub mod control_plane;
pub mod kubelet;
pub mod lab;

//! The real Kubernetes control plane (`rproxy_tests::k8s::control_plane`) on its own: it starts,
//! serves (version, namespaces, a `Deployment`'s `ReplicaSet` and pods, RBAC), survives an etcd
//! compaction and an apiserver restart, and stops without leaving a process behind. Runs the
//! binaries `scripts/build-k8s.sh` builds (`RPROXY_K8S_BIN` overrides them). Needs root; skipped
//! without it unless `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::{errno::Errno, sys::signal::kill, unistd::Pid};
use rproxy_tests::{
    cmd::run,
    k8s::control_plane::{ControlPlane, ControlPlaneConfig},
    serial_or_skip,
};
use serde_json::Value;

/// The Kubernetes release `tests/k8s/go.mod` pins.
const KUBERNETES_VERSION: &str = "v1.36.3";
/// How long the Deployment may take to have its `ReplicaSet` and unschedulable pods.
const DEPLOYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `body` holding the serial lock; skipped when not root.
fn serially(test: &str, body: impl FnOnce() -> Result<()>) {
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    if let Err(e) = body() {
        panic!("{test}: {e:?}");
    }
}

/// `kubectl <args> -o json` as JSON.
fn kubectl_json(cp: &ControlPlane, args: &[&str]) -> Result<Value> {
    let out = run(cp.kubectl().args(args).args(["-o", "json"]))?;
    serde_json::from_str(&out).with_context(|| format!("kubectl {args:?}: not JSON: {out}"))
}

/// Whether the Deployment `web` in `t1` has a `ReplicaSet` and two Pending pods the scheduler
/// found no node for (there are no nodes).
fn deployment_pending(cp: &ControlPlane) -> Result<bool> {
    let replica_sets = kubectl_json(cp, &["-n", "t1", "get", "replicasets", "-l", "app=web"])?;
    let owned_by_web = |rs: &Value| rs["metadata"]["ownerReferences"][0]["name"] == "web";
    if !replica_sets["items"].as_array().is_some_and(|items| items.len() == 1 && items.iter().all(owned_by_web)) {
        return Ok(false);
    }
    let pods = kubectl_json(cp, &["-n", "t1", "get", "pods", "-l", "app=web"])?;
    let unschedulable = |pod: &Value| {
        pod["status"]["phase"] == "Pending"
            && pod["status"]["conditions"].as_array().is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c["type"] == "PodScheduled" && c["status"] == "False" && c["reason"] == "Unschedulable")
            })
    };
    Ok(pods["items"].as_array().is_some_and(|items| items.len() == 2 && items.iter().all(unschedulable)))
}

#[test]
fn control_plane_starts_serves_restarts_and_stops() {
    serially("control_plane_starts_serves_restarts_and_stops", || {
        let t0 = Instant::now();
        let work = tempfile::tempdir()?;
        let bin_dir = ControlPlane::bin_dir()?;
        let mut cp = ControlPlane::start(ControlPlaneConfig {
            bin_dir,
            work_dir: work.path().to_path_buf(),
            extra_sans: vec!["172.31.0.250".parse()?],
            service_cidr: "10.96.0.0/16".into(),
        })?;
        eprintln!("control plane up at {} in {:?}", cp.api_url(), t0.elapsed());
        ensure!(cp.api_url() == format!("https://127.0.0.1:{}", cp.api_port()));
        ensure!(cp.ca_file().is_file() && cp.admin_kubeconfig().is_file());

        let version = kubectl_json(&cp, &["version"])?;
        ensure!(
            version["serverVersion"]["gitVersion"] == KUBERNETES_VERSION,
            "server version: {}",
            version["serverVersion"]
        );

        run(cp.kubectl().args(["create", "namespace", "t1"]))?;
        run(cp
            .kubectl()
            .args(["-n", "t1", "create", "deployment", "web", "--image=registry.invalid/web:1"])
            .arg("--replicas=2"))?;
        let since = Instant::now();
        while !deployment_pending(&cp)? {
            ensure!(
                since.elapsed() < DEPLOYMENT_TIMEOUT,
                "no ReplicaSet with 2 unschedulable Pending pods within {DEPLOYMENT_TIMEOUT:?}: {}",
                run(cp.kubectl().args(["-n", "t1", "get", "deployments,replicasets,pods", "-o", "wide"]))?
            );
            thread::sleep(Duration::from_millis(250));
        }

        let can_i = run(cp.kubectl().args(["auth", "can-i", "list", "pods"]))?;
        ensure!(can_i.trim() == "yes", "admin cannot list pods: {can_i}");

        // A kubeconfig for the same identity through another URL of the same server.
        let other = work.path().join("other.kubeconfig");
        cp.write_kubeconfig(&other, &format!("https://localhost:{}", cp.api_port()), cp.admin_token())?;
        run(cp.kubectl().arg("--kubeconfig").arg(&other).args(["get", "namespace", "t1"]))?;

        let revision = cp.compact_etcd()?;
        ensure!(revision > 0, "compacted at revision {revision}");

        let restart = Instant::now();
        cp.restart_apiserver()?;
        eprintln!("apiserver restarted in {:?}", restart.elapsed());
        run(cp.kubectl().args(["get", "namespace", "t1"]))?;

        let pids = cp.pids();
        ensure!(pids.len() == 4, "running: {pids:?}");
        let stop = Instant::now();
        cp.stop()?;
        eprintln!("stopped in {:?}", stop.elapsed());
        for (name, pid) in pids {
            let pid = Pid::from_raw(i32::try_from(pid)?);
            ensure!(kill(pid, None) == Err(Errno::ESRCH), "{name} (pid {pid}) is still there after stop()");
        }
        ensure!(cp.pids().is_empty());
        for name in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"] {
            let log = cp.log_dir().join(format!("{name}.log"));
            ensure!(log.metadata().is_ok_and(|m| m.len() > 0), "{} is missing or empty", log.display());
        }
        eprintln!("test done in {:?}", t0.elapsed());
        Ok(())
    });
}

//! A real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler run as child processes of the test (or of `cargo xtask cluster`) on 127.0.0.1 of
//! the host network namespace, from the binaries `scripts/build-k8s.sh` builds
//! ([`ControlPlane::bin_dir`]).
//!
//! [`ControlPlane::start`] makes everything under [`ControlPlaneConfig::work_dir`]:
//!
//! - `certs/`: a CA (EC P-256) made with the `openssl` CLI, the apiserver's serving certificate
//!   signed by it (SANs: 127.0.0.1, the first IP of the service CIDR, the extra SANs and the
//!   `kubernetes.default.svc...` names, so that pods reaching the `kubernetes` Service verify it
//!   too), the service-account key pair (RSA 2048; the private key file serves as the public key
//!   file as well) and the static token file with one admin token (group `system:masters`);
//! - `admin.kubeconfig`: the API URL, the CA's data and the admin token;
//! - `etcd/`, `kcm-certs/`, `sched-certs/`: etcd's data and the self-signed serving certificates
//!   of the controller manager and the scheduler; `kubectl-cache/`: [`ControlPlane::kubectl`]'s
//!   discovery cache;
//! - `logs/<component>.log`: each process's stdout and stderr.
//!
//! Leftovers of an earlier run in these places are removed first: certificates, token and etcd
//! data only make sense together. Ports are picked free on 127.0.0.1 at start and kept for the
//! life of the [`ControlPlane`] (a restarted apiserver listens on the same port).
//!
//! Why these flags:
//!
//! - etcd runs one member, without fsync (`--unsafe-no-fsync`: test data, speed);
//! - kube-apiserver binds 127.0.0.1 and advertises it: nothing outside this host needs it
//!   directly (the lab's nodes reach it through a TCP forwarder in the test process). With a
//!   loopback advertise address the `kubernetes` Service's endpoints cannot be reconciled, hence
//!   `--endpoint-reconciler-type=none` (the `kubernetes` Service has no endpoints; no pod here
//!   needs it). Authentication is the static token file (plus client certificates from the CA),
//!   authorization RBAC. The `ServiceAccount`
//!   admission plugin is off so that pods need no token volume (there are no kubelets to mount
//!   one), and `--allow-privileged` lets the lab run privileged pods;
//! - kube-controller-manager runs every controller but `nodelifecycle` (without kubelets it
//!   would taint the nodes unreachable and evict every pod) and `nodeipam` (the lab sets the
//!   node CIDRs), with the admin identity (`--use-service-account-credentials=false`) and no
//!   leader election;
//! - kube-scheduler runs with the admin identity and no leader election.
//!
//! Every process runs in its own process group, so that a terminal's Ctrl-C reaches only the
//! parent, which then stops them by pid: the controller manager and scheduler first, then the
//! apiserver, then etcd (an apiserver and etcd stopped together hang: the apiserver's shutdown
//! waits for etcd), each with SIGTERM and, after 10 s, SIGKILL. Dropping the [`ControlPlane`] does
//! the same.
use std::{
    ffi::{OsStr, OsString},
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::cmd::run;

/// How long a component may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long etcd may take to report healthy.
const ETCD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the apiserver may take to report ready.
const APISERVER_TIMEOUT: Duration = Duration::from_mins(1);
/// How long the controller manager and the scheduler may take to serve.
const CONTROLLERS_TIMEOUT: Duration = Duration::from_mins(1);
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How many lines of a component's log an error quotes.
const LOG_TAIL_LINES: usize = 30;
/// The service-account token issuer and the apiserver's audience.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The binaries [`ControlPlane::bin_dir`] must hold.
const BINARIES: [&str; 5] = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"];

/// What [`ControlPlane::start`] runs.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Holds `etcd`, `kube-apiserver`, `kube-controller-manager`, `kube-scheduler` and `kubectl`.
    pub bin_dir: PathBuf,
    /// Everything goes under it: certificates, etcd's data, logs, kubeconfigs.
    pub work_dir: PathBuf,
    /// More IPs for the apiserver's serving certificate (beyond 127.0.0.1 and the first IP of
    /// the service CIDR).
    pub extra_sans: Vec<IpAddr>,
    /// `--service-cluster-ip-range`, e.g. `10.96.0.0/16`, or two of different families,
    /// comma-separated (a dual-stack cluster; the first is the primary family).
    pub service_cidr: String,
}

/// The four components, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Etcd,
    Apiserver,
    ControllerManager,
    Scheduler,
}

impl Component {
    /// The binary's name, also the log's (`<name>.log`) and the one errors use.
    fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Apiserver => "kube-apiserver",
            Self::ControllerManager => "kube-controller-manager",
            Self::Scheduler => "kube-scheduler",
        }
    }
}

/// Free ports on 127.0.0.1, picked once.
#[derive(Debug, Clone, Copy)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

/// A running component (or one that has exited). Dropping it kills the process if it still runs.
#[derive(Debug)]
struct Process {
    component: Component,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `<bin_dir>/<name> <args>` in its own process group with stdout and stderr appended
    /// to `log`.
    fn spawn(component: Component, bin_dir: &Path, args: &[OsString], log: PathBuf) -> Result<Self> {
        let name = component.name();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("{name}: cannot open its log {}", log.display()))?;
        let child = Command::new(bin_dir.join(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().with_context(|| format!("{name}: cannot duplicate the log's fd"))?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin_dir.join(name).display()))?;
        Ok(Self { component, child, log })
    }

    fn pid(&self) -> Pid {
        // Pids fit in i32 (pid_max ≤ 2^22).
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// The exit status if the process has exited.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("{}: waitpid", self.component.name()))
    }

    /// Sends SIGTERM unless the process has exited.
    fn terminate(&mut self) -> Result<()> {
        if self.exited()?.is_none() {
            kill(self.pid(), Signal::SIGTERM).with_context(|| format!("kill(SIGTERM) {}", self.component.name()))?;
        }
        Ok(())
    }

    /// Waits for the exit until `deadline`, then kills the process (and fails).
    fn wait_or_kill(&mut self, deadline: Instant) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let name = self.component.name();
                self.child.kill().with_context(|| format!("kill(SIGKILL) {name}"))?;
                self.child.wait().with_context(|| format!("{name}: waitpid"))?;
                bail!("{name} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last [`LOG_TAIL_LINES`] lines of the log, introduced by its path.
    fn log_tail(&self) -> String {
        let text = match fs::read(&self.log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return format!("<cannot read {}: {e}>", self.log.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!("last {LOG_TAIL_LINES} lines of {}:\n{tail}", self.log.display())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// SIGTERMs all of `processes` at once, then waits for each (killing it after [`STOP_TIMEOUT`]).
/// Returns the errors.
fn stop_together(processes: impl IntoIterator<Item = Process>) -> Vec<anyhow::Error> {
    let mut processes: Vec<Process> = processes.into_iter().collect();
    let mut errors = Vec::new();
    for p in &mut processes {
        if let Err(e) = p.terminate() {
            errors.push(e);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for p in &mut processes {
        if let Err(e) = p.wait_or_kill(deadline) {
            errors.push(e);
        }
    }
    errors
}

/// Paths under the work directory.
#[derive(Debug, Clone)]
struct Paths {
    certs: PathBuf,
    ca_cert: PathBuf,
    apiserver_cert: PathBuf,
    apiserver_key: PathBuf,
    service_account_key: PathBuf,
    token_file: PathBuf,
    admin_kubeconfig: PathBuf,
    etcd_data: PathBuf,
    controller_manager_certs: PathBuf,
    scheduler_certs: PathBuf,
    kubectl_cache: PathBuf,
    logs: PathBuf,
}

impl Paths {
    fn new(work_dir: &Path) -> Self {
        let certs = work_dir.join("certs");
        Self {
            ca_cert: certs.join("ca.crt"),
            apiserver_cert: certs.join("apiserver.crt"),
            apiserver_key: certs.join("apiserver.key"),
            service_account_key: certs.join("service-account.key"),
            token_file: certs.join("tokens.csv"),
            certs,
            admin_kubeconfig: work_dir.join("admin.kubeconfig"),
            etcd_data: work_dir.join("etcd"),
            controller_manager_certs: work_dir.join("kcm-certs"),
            scheduler_certs: work_dir.join("sched-certs"),
            kubectl_cache: work_dir.join("kubectl-cache"),
            logs: work_dir.join("logs"),
        }
    }

    /// Removes what an earlier run left and creates the directories (but etcd's, which etcd
    /// creates with the permissions it wants).
    fn prepare(&self) -> Result<()> {
        let made = [&self.certs, &self.etcd_data, &self.controller_manager_certs, &self.scheduler_certs, &self.logs];
        for dir in made.into_iter().chain([&self.kubectl_cache]) {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
        for dir in [&self.certs, &self.controller_manager_certs, &self.scheduler_certs, &self.logs] {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(())
    }
}

/// A running control plane; see the module documentation. Dropping it stops everything.
#[derive(Debug)]
pub struct ControlPlane {
    config: ControlPlaneConfig,
    paths: Paths,
    ports: Ports,
    admin_token: String,
    /// The CA certificate (PEM), base64-encoded for kubeconfigs.
    ca_data: String,
    etcd: Option<Process>,
    apiserver: Option<Process>,
    controller_manager: Option<Process>,
    scheduler: Option<Process>,
}

impl ControlPlane {
    /// The directory holding the binaries: `$RPROXY_K8S_BIN` if set, else the last line
    /// `scripts/build-k8s.sh` prints (it builds them the first time, which takes a while; its
    /// progress goes to this process's stderr).
    pub fn bin_dir() -> Result<PathBuf> {
        let dir = if let Some(dir) = std::env::var_os("RPROXY_K8S_BIN") {
            PathBuf::from(dir)
        } else {
            let script = crate::workspace_root().join("scripts/build-k8s.sh");
            let out = run(Command::new(&script).stderr(Stdio::inherit()))?;
            let last = out.lines().rev().find(|l| !l.trim().is_empty());
            PathBuf::from(last.with_context(|| format!("{} printed no bin directory", script.display()))?.trim())
        };
        for bin in BINARIES {
            ensure!(dir.join(bin).is_file(), "Kubernetes bin dir {}: no {bin} in it", dir.display());
        }
        Ok(dir)
    }

    /// Makes the certificates and kubeconfig, starts etcd, kube-apiserver, kube-controller-manager
    /// and kube-scheduler and waits until each serves: etcd's `/health`, the apiserver's
    /// `/readyz`, the `default` `ServiceAccount` of `kube-system` (made by the controller
    /// manager) and the controller manager's and the scheduler's secure ports. On error, whatever
    /// started is stopped and the error names the component, with the end of its log.
    pub fn start(config: ControlPlaneConfig) -> Result<Self> {
        let paths = Paths::new(&config.work_dir);
        paths.prepare()?;
        let [etcd_client, etcd_peer, apiserver, controller_manager, scheduler] = free_ports()?;
        let ports = Ports { etcd_client, etcd_peer, apiserver, controller_manager, scheduler };
        let service_ip = first_service_ip(&config.service_cidr)?;
        make_certificates(&paths, service_ip, &config.extra_sans)?;
        let admin_token = random_hex(16)?;
        write_private(&paths.token_file, &format!("{admin_token},admin,admin,system:masters\n"))?;
        let ca_pem = fs::read(&paths.ca_cert).with_context(|| format!("cannot read {}", paths.ca_cert.display()))?;
        let mut control_plane = Self {
            config,
            paths,
            ports,
            admin_token,
            ca_data: base64(&ca_pem),
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
        };
        let admin = control_plane.paths.admin_kubeconfig.clone();
        control_plane.write_kubeconfig(&admin, &control_plane.api_url(), &control_plane.admin_token)?;
        if let Err(e) = control_plane.start_components() {
            // Errors stopping are secondary to the one that made the start fail.
            let _ = control_plane.stop();
            return Err(e);
        }
        Ok(control_plane)
    }

    fn start_components(&mut self) -> Result<()> {
        self.spawn(Component::Etcd)?;
        self.wait_ready(Component::Etcd, ETCD_TIMEOUT, "GET /health says healthy", Self::etcd_healthy)?;
        self.start_apiserver()?;
        self.spawn(Component::ControllerManager)?;
        self.spawn(Component::Scheduler)?;
        self.wait_ready(
            Component::ControllerManager,
            CONTROLLERS_TIMEOUT,
            "the default ServiceAccount of kube-system exists and the secure port accepts connections",
            |cp| {
                port_open(cp.ports.controller_manager)
                    && run(cp.kubectl().args(["-n", "kube-system", "get", "serviceaccount", "default", "-o", "name"]))
                        .is_ok()
            },
        )?;
        self.wait_ready(Component::Scheduler, CONTROLLERS_TIMEOUT, "the secure port accepts connections", |cp| {
            port_open(cp.ports.scheduler)
        })
    }

    /// The apiserver's secure port on 127.0.0.1.
    #[must_use]
    pub fn api_port(&self) -> u16 {
        self.ports.apiserver
    }

    /// `https://127.0.0.1:<api_port>`.
    #[must_use]
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// `http://127.0.0.1:<port>`: etcd's client URL.
    #[must_use]
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.etcd_client)
    }

    /// The PEM file of the CA that signed the apiserver's serving certificate (also its client
    /// CA).
    #[must_use]
    pub fn ca_file(&self) -> &Path {
        &self.paths.ca_cert
    }

    /// A kubeconfig with [`Self::api_url`], the CA's data and the admin token.
    #[must_use]
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.paths.admin_kubeconfig
    }

    /// The admin bearer token (user `admin`, group `system:masters`).
    #[must_use]
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Writes a kubeconfig (mode 0600) for `server` (e.g. a forwarder's URL; the serving
    /// certificate must name its address, see [`ControlPlaneConfig::extra_sans`]) with this
    /// control plane's CA and the bearer `token`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, token: &str) -> Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "rproxy",
                "cluster": { "server": server, "certificate-authority-data": self.ca_data },
            }],
            "users": [{ "name": "rproxy", "user": { "token": token } }],
            "contexts": [{ "name": "rproxy", "context": { "cluster": "rproxy", "user": "rproxy" } }],
            "current-context": "rproxy",
        });
        // JSON is YAML: kubectl, client-go and kube-rs all read it.
        let text = serde_json::to_string_pretty(&config).context("serialising a kubeconfig")?;
        write_private(path, &(text + "\n"))
    }

    /// `<bin_dir>/kubectl --kubeconfig <admin kubeconfig> --cache-dir <work_dir>/kubectl-cache` (the
    /// discovery cache of a server on a random port has no business in `~/.kube/cache`).
    #[must_use]
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.config.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.paths.admin_kubeconfig).arg("--cache-dir").arg(&self.paths.kubectl_cache);
        cmd
    }

    /// The pids of the running components, by name (for checks that nothing outlives [`Self::stop`]).
    #[must_use]
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [&self.etcd, &self.apiserver, &self.controller_manager, &self.scheduler]
            .into_iter()
            .flatten()
            .map(|p| (p.component.name(), p.child.id()))
            .collect()
    }

    /// The directory of the components' logs (`<name>.log`).
    #[must_use]
    pub fn log_dir(&self) -> &Path {
        &self.paths.logs
    }

    /// Stops the apiserver (SIGTERM; SIGKILL after 10 s). Nothing happens when it is not running.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        stop_together(self.apiserver.take()).into_iter().next().map_or(Ok(()), Err)
    }

    /// Starts the apiserver with the same flags and port as before and waits for `/readyz`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        ensure!(self.apiserver.is_none(), "kube-apiserver is running already");
        self.spawn(Component::Apiserver)?;
        self.wait_ready(Component::Apiserver, APISERVER_TIMEOUT, "kubectl get --raw /readyz says ok", |cp| {
            run(cp.kubectl().args(["get", "--raw", "/readyz", "--request-timeout=5s"]))
                .is_ok_and(|out| out.trim() == "ok")
        })
    }

    /// [`Self::stop_apiserver`] then [`Self::start_apiserver`].
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Compacts etcd (physically) at its current revision and returns that revision: watches from
    /// older resource versions that reach etcd then fail with 410 Gone.
    ///
    /// The apiserver's watch cache is not etcd: until the apiserver restarts it still serves
    /// watches from resource versions it holds (a restarted apiserver's cache starts at the
    /// current revision, and answers older ones with 410 "too old resource version" anyway).
    pub fn compact_etcd(&self) -> Result<i64> {
        let port = self.ports.etcd_client;
        // The key "/" (base64), to learn the store's revision from the response's header.
        let range = http_json(port, "POST", "/v3/kv/range", Some(&json!({ "key": "Lw==" })))
            .context("etcd: POST /v3/kv/range")?;
        let revision = &range["header"]["revision"];
        // The JSON gateway writes int64 as a string.
        let revision = revision
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| revision.as_i64())
            .with_context(|| format!("etcd: no header.revision in the range response {range}"))?;
        http_json(port, "POST", "/v3/kv/compaction", Some(&json!({ "revision": revision, "physical": true })))
            .with_context(|| format!("etcd: compaction at revision {revision}"))?;
        Ok(revision)
    }

    /// Stops the controller manager and the scheduler (together), then the apiserver, then etcd:
    /// each gets SIGTERM and, after 10 s, SIGKILL. Everything is stopped even when something
    /// fails; the error lists every failure. Stopping a stopped control plane does nothing.
    pub fn stop(&mut self) -> Result<()> {
        let mut errors = stop_together([self.controller_manager.take(), self.scheduler.take()].into_iter().flatten());
        errors.extend(stop_together(self.apiserver.take()));
        errors.extend(stop_together(self.etcd.take()));
        if errors.is_empty() {
            return Ok(());
        }
        let mut message = String::from("stopping the control plane");
        for e in &errors {
            let _ = write!(message, "; {e:#}");
        }
        bail!(message)
    }

    /// The process slot of `component`.
    fn slot(&mut self, component: Component) -> &mut Option<Process> {
        match component {
            Component::Etcd => &mut self.etcd,
            Component::Apiserver => &mut self.apiserver,
            Component::ControllerManager => &mut self.controller_manager,
            Component::Scheduler => &mut self.scheduler,
        }
    }

    /// Starts `component` with [`Self::args`] into its slot.
    fn spawn(&mut self, component: Component) -> Result<()> {
        let args = self.args(component);
        let log = self.paths.logs.join(format!("{}.log", component.name()));
        let process = Process::spawn(component, &self.config.bin_dir, &args, log)?;
        *self.slot(component) = Some(process);
        Ok(())
    }

    /// Polls `ready` until it holds, failing (with the end of the log) if `component` exits or
    /// `timeout` passes first. `what` says what `ready` checks.
    fn wait_ready(
        &mut self,
        component: Component,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let name = component.name();
        let start = Instant::now();
        loop {
            let process = self.slot(component).as_mut().with_context(|| format!("{name} is not running"))?;
            if let Some(status) = process.exited()? {
                bail!("{name} exited ({status}) before it was ready; {}", process.log_tail());
            }
            if ready(self) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                let tail = self.slot(component).as_ref().map_or_else(String::new, Process::log_tail);
                bail!("{name} not ready within {timeout:?} (waited until {what}); {tail}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn etcd_healthy(&self) -> bool {
        http_json(self.ports.etcd_client, "GET", "/health", None).is_ok_and(|health| health["health"] == "true")
    }

    /// The command-line arguments of `component`.
    fn args(&self, component: Component) -> Vec<OsString> {
        let (p, ports) = (&self.paths, &self.ports);
        let etcd_peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
        let etcd_client = self.etcd_url();
        match component {
            Component::Etcd => vec![
                "--name=rproxy".into(),
                flag("data-dir", &p.etcd_data),
                flag("listen-client-urls", &etcd_client),
                flag("advertise-client-urls", &etcd_client),
                flag("listen-peer-urls", &etcd_peer),
                flag("initial-advertise-peer-urls", &etcd_peer),
                flag("initial-cluster", format!("rproxy={etcd_peer}")),
                "--initial-cluster-state=new".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            Component::Apiserver => vec![
                flag("etcd-servers", &etcd_client),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                flag("secure-port", ports.apiserver.to_string()),
                flag("tls-cert-file", &p.apiserver_cert),
                flag("tls-private-key-file", &p.apiserver_key),
                flag("client-ca-file", &p.ca_cert),
                flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER),
                flag("service-account-key-file", &p.service_account_key),
                flag("service-account-signing-key-file", &p.service_account_key),
                flag("api-audiences", SERVICE_ACCOUNT_ISSUER),
                "--authorization-mode=RBAC".into(),
                flag("token-auth-file", &p.token_file),
                "--endpoint-reconciler-type=none".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                flag("service-cluster-ip-range", &self.config.service_cidr),
                "--allow-privileged=true".into(),
                // Without it, a SIGTERMed apiserver waits up to --request-timeout (60 s) for its
                // open watches (the controllers', the agents') to end.
                "--shutdown-send-retry-after=true".into(),
                "--v=1".into(),
            ],
            Component::ControllerManager => vec![
                flag("kubeconfig", &p.admin_kubeconfig),
                "--bind-address=127.0.0.1".into(),
                flag("secure-port", ports.controller_manager.to_string()),
                flag("cert-dir", &p.controller_manager_certs),
                "--leader-elect=false".into(),
                flag("service-account-private-key-file", &p.service_account_key),
                flag("root-ca-file", &p.ca_cert),
                "--use-service-account-credentials=false".into(),
                "--controllers=*,-nodelifecycle,-nodeipam".into(),
            ],
            Component::Scheduler => vec![
                flag("kubeconfig", &p.admin_kubeconfig),
                "--bind-address=127.0.0.1".into(),
                flag("secure-port", ports.scheduler.to_string()),
                flag("cert-dir", &p.scheduler_certs),
                "--leader-elect=false".into(),
            ],
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `--<name>=<value>`.
fn flag(name: &str, value: impl AsRef<OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

/// `N` distinct free ports on 127.0.0.1: all are bound at once, then released.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().context("local_addr of a listener on 127.0.0.1:0")?.port();
    }
    Ok(ports)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1)).is_ok()
}

/// The first host address of `cidr` (the `kubernetes` Service's ClusterIP): 10.96.0.1 for
/// 10.96.0.0/16.
fn first_service_ip(cidrs: &str) -> Result<IpAddr> {
    // The kubernetes Service's address comes from the primary range.
    let cidr = cidrs.split(',').next().unwrap_or_default();
    let parse = || -> Option<(IpAddr, u32)> {
        let (addr, len) = cidr.split_once('/')?;
        Some((addr.parse().ok()?, len.parse().ok()?))
    };
    let (addr, len) = parse().with_context(|| format!("service CIDR {cidr:?} is not ADDRESS/LENGTH"))?;
    Ok(match addr {
        IpAddr::V4(addr) => {
            ensure!(len <= 30, "service CIDR {cidr}: prefix longer than /30");
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from((u32::from(addr) & mask) + 1))
        }
        IpAddr::V6(addr) => {
            ensure!(len <= 126, "service CIDR {cidr}: prefix longer than /126");
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from((u128::from(addr) & mask) + 1))
        }
    })
}

/// Makes the CA, the apiserver's serving certificate and the service-account key with the
/// `openssl` CLI, from a config file of our own (not the system's).
fn make_certificates(paths: &Paths, service_ip: IpAddr, extra_sans: &[IpAddr]) -> Result<()> {
    let dir = &paths.certs;
    let ca_key = dir.join("ca.key");
    let csr = dir.join("apiserver.csr");
    let cnf = dir.join("openssl.cnf");
    let mut sans: Vec<String> =
        [IpAddr::V4(Ipv4Addr::LOCALHOST), service_ip].iter().chain(extra_sans).map(|ip| format!("IP:{ip}")).collect();
    sans.dedup();
    sans.extend(
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(|name| format!("DNS:{name}")),
    );
    let config = format!(
        "[req]\n\
         distinguished_name = dn\n\
         prompt = no\n\
         [dn]\n\
         CN = rproxy\n\
         [ca]\n\
         basicConstraints = critical, CA:TRUE\n\
         keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n\
         subjectKeyIdentifier = hash\n\
         [server]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n\
         subjectAltName = {}\n",
        sans.join(", ")
    );
    fs::write(&cnf, config).with_context(|| format!("cannot write {}", cnf.display()))?;
    let openssl = |cmd: &mut Command| run(cmd).context("certificates: openssl failed");
    let ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout"];
    let days = ["-days", "3650"];
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-subj", "/CN=rproxy-ca", "-extensions", "ca", "-config"])
            .arg(&cnf)
            .args(ec_key)
            .arg(&ca_key)
            .args(days)
            .arg("-out")
            .arg(&paths.ca_cert),
    )?;
    openssl(
        Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=kube-apiserver", "-config"])
            .arg(&cnf)
            .args(ec_key)
            .arg(&paths.apiserver_key)
            .arg("-out")
            .arg(&csr),
    )?;
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-extensions", "server", "-extfile"])
            .arg(&cnf)
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&paths.ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-CAserial"])
            .arg(dir.join("ca.srl"))
            .args(days)
            .arg("-out")
            .arg(&paths.apiserver_cert),
    )?;
    openssl(Command::new("openssl").args(["genrsa", "-out"]).arg(&paths.service_account_key).arg("2048"))?;
    Ok(())
}

/// `len` random bytes from /dev/urandom, as hex.
fn random_hex(len: usize) -> Result<String> {
    let mut bytes = vec![0; len];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("cannot read /dev/urandom")?;
    Ok(bytes.iter().fold(String::with_capacity(2 * len), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

/// Writes `text` to `path` readable by the owner only (it holds a token).
fn write_private(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let bits = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(bits >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A plain-HTTP request to 127.0.0.1:`port` with an optional JSON body; fails unless the answer
/// is 200, else returns the answer's JSON. HTTP/1.0, so that the server neither keeps the
/// connection nor chunks the body.
fn http_json(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("HTTP response without a header end")?;
    let status = head.split_whitespace().nth(1).context("HTTP response without a status")?;
    ensure!(status == "200", "HTTP {status}: {}", body.trim());
    serde_json::from_str(body).with_context(|| format!("HTTP response not JSON: {}", body.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_service_ip_is_the_network_plus_one() {
        assert_eq!(first_service_ip("10.96.0.0/16").unwrap(), "10.96.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(first_service_ip("10.96.7.9/12").unwrap(), "10.96.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(first_service_ip("fd00:10:96::/112").unwrap(), "fd00:10:96::1".parse::<IpAddr>().unwrap());
        assert_eq!(first_service_ip("10.96.0.0/16,fd00:96::/112").unwrap(), "10.96.0.1".parse::<IpAddr>().unwrap());
        assert!(first_service_ip("10.96.0.0").is_err());
        assert!(first_service_ip("10.96.0.0/31").is_err());
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"/"), "Lw==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b"hello world"), "aGVsbG8gd29ybGQ=");
    }

    #[test]
    fn flags_keep_paths_as_they_are() {
        assert_eq!(flag("data-dir", Path::new("/tmp/x y")), OsString::from("--data-dir=/tmp/x y"));
    }
}

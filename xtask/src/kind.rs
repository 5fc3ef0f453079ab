//! `cargo xtask run`: the release agent on one node of a kind cluster, watching the cluster's API
//! server.
//!
//! A kind node is a privileged container whose network namespace holds that node's pod veths, so
//! the agent runs inside it (`docker exec`), as it would on a real node. The steps:
//! 1. `kind get nodes --name CLUSTER` lists the node containers; the agent goes to `--node`, else
//!    the first worker, else the control plane;
//! 2. in the node: refuse if an agent started this way still runs there, and mount a bpffs on
//!    `/sys/fs/bpf` unless one is there (a kind node's `/sys` is a fresh sysfs);
//! 3. `docker cp` the binary to [`NODE_AGENT`];
//! 4. `kind get kubeconfig --internal` (the API server by its container name, reachable from the
//!    nodes) into [`NODE_KUBECONFIG`];
//! 5. `rproxy-agent run` in the foreground. With a terminal, `docker exec -it` carries Ctrl-C to
//!    the agent. Without one, `docker exec` would not forward signals, so the agent's pid is kept
//!    in [`NODE_PIDFILE`] and a Ctrl-C (or SIGTERM) here sends it SIGTERM through `docker exec`.
//!
//! Every command line is built by a pure function below (unit-tested; `--dry-run` prints them);
//! [`run`] executes them.
use std::{
    fmt,
    io::{IsTerminal as _, Write as _},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Default `--pod-devices`: the host-side pod interfaces of kindnet, Flannel and most bridge
/// CNIs (`veth*`), Calico (`cali*`) and Cilium (`lxc*`).
pub const DEFAULT_POD_DEVICES: &str = "veth*,cali*,lxc*";
/// The external device of a kind node.
pub const DEFAULT_DEVICES: &str = "eth0";
/// Where the agent binary goes in the node.
pub const NODE_AGENT: &str = "/usr/local/bin/rproxy-agent";
/// Where the cluster's internal kubeconfig goes in the node.
pub const NODE_KUBECONFIG: &str = "/etc/rproxy/kubeconfig";
/// The agent's pin directory in the node.
pub const NODE_BPFFS: &str = "/sys/fs/bpf/rproxy";
/// The pid of the agent started by `cargo xtask run`, in the node.
pub const NODE_PIDFILE: &str = "/run/rproxy-agent.pid";
/// Stands for the node in `--dry-run` output when `--node` is not given.
const NODE_PLACEHOLDER: &str = "NODE";

/// The container engine kind runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    #[default]
    Docker,
    Podman,
}

impl Engine {
    fn program(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }

    /// The environment `kind` needs to use this engine.
    fn kind_env(self) -> Vec<(String, String)> {
        match self {
            Self::Docker => Vec::new(),
            Self::Podman => vec![("KIND_EXPERIMENTAL_PROVIDER".into(), "podman".into())],
        }
    }
}

/// `cargo xtask run` options.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// The kind cluster (`kind create cluster --name`).
    #[arg(long, default_value = "kind")]
    pub cluster: String,
    /// The node to run on (a name from `kind get nodes`). Default: the first worker, else the
    /// control plane.
    #[arg(long)]
    pub node: Option<String>,
    /// The container engine kind uses.
    #[arg(long, value_enum, default_value_t)]
    pub engine: Engine,
    /// The agent's --pod-devices: comma-separated globs of host-side pod interfaces.
    #[arg(long, default_value = DEFAULT_POD_DEVICES)]
    pub pod_devices: String,
    /// The agent's --devices: the node's external devices, where NodePorts answer (a kind
    /// node's is eth0). Empty: no NodePort.
    #[arg(long, default_value = DEFAULT_DEVICES)]
    pub devices: String,
    /// Print the commands instead of running them (builds nothing, asks kind nothing).
    #[arg(long)]
    pub dry_run: bool,
}

/// One command line: environment, program and arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub env: Vec<(String, String)>,
    pub program: String,
    pub args: Vec<String>,
}

impl Cmdline {
    fn new<S: Into<String>>(program: &str, args: impl IntoIterator<Item = S>) -> Self {
        Self { env: Vec::new(), program: program.into(), args: args.into_iter().map(Into::into).collect() }
    }

    /// The process to spawn.
    #[must_use]
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// Shell syntax, quoted so that it can be pasted.
impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .chain(std::iter::once(quote(&self.program)))
            .chain(self.args.iter().map(|a| quote(a)));
        write!(f, "{}", words.collect::<Vec<_>>().join(" "))
    }
}

fn quote(word: &str) -> String {
    // `try_quote` fails only on a NUL byte, which no argument here can carry to a process anyway.
    shlex::try_quote(word).map_or_else(|_| word.replace('\0', "\\0"), std::borrow::Cow::into_owned)
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run to completion; a non-zero exit fails the plan.
    Run { what: &'static str, cmd: Cmdline },
    /// Run `from` and feed its stdout to `to` (`from | to`); either failing fails the plan.
    Pipe { what: &'static str, from: Cmdline, to: Cmdline },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run { what, cmd } => write!(f, "# {what}\n{cmd}"),
            Self::Pipe { what, from, to } => write!(f, "# {what}\n{from} | {to}"),
        }
    }
}

/// A node's role, from its container name (`CLUSTER-control-plane[N]`, `CLUSTER-worker[N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Worker,
    ControlPlane,
}

/// The role and ordinal (`worker` is 1, `worker2` is 2) of a node of `cluster`; `None` for the
/// external load balancer of an HA cluster (not a Kubernetes node) and for foreign names.
#[must_use]
pub fn node_role(cluster: &str, name: &str) -> Option<(Role, u32)> {
    let rest = name.strip_prefix(cluster)?.strip_prefix('-')?;
    let (role, suffix) = if let Some(n) = rest.strip_prefix("control-plane") {
        (Role::ControlPlane, n)
    } else {
        (Role::Worker, rest.strip_prefix("worker")?)
    };
    let ordinal = if suffix.is_empty() { 1 } else { suffix.parse().ok().filter(|&n| n > 1)? };
    Some((role, ordinal))
}

/// The node to run on, from the output of `kind get nodes`: `requested` if it is one of the
/// cluster's nodes, else the first worker, else the first control plane.
pub fn choose_node(cluster: &str, listing: &str, requested: Option<&str>) -> Result<String> {
    let mut nodes: Vec<(Role, u32, &str)> = listing
        .lines()
        .map(str::trim)
        .filter_map(|name| node_role(cluster, name).map(|(role, n)| (role, n, name)))
        .collect();
    nodes.sort_unstable();
    if nodes.is_empty() {
        bail!("kind cluster {cluster:?} has no nodes (create it with `kind create cluster --name {cluster}`)");
    }
    match requested {
        None => Ok(nodes[0].2.to_owned()),
        Some(want) if nodes.iter().any(|&(_, _, name)| name == want) => Ok(want.to_owned()),
        Some(want) => {
            let names: Vec<_> = nodes.iter().map(|&(_, _, name)| name).collect();
            bail!("{want:?} is not a node of kind cluster {cluster:?}; its nodes: {}", names.join(", "))
        }
    }
}

/// `kind get nodes --name CLUSTER`.
#[must_use]
pub fn kind_get_nodes(engine: Engine, cluster: &str) -> Cmdline {
    Cmdline { env: engine.kind_env(), ..Cmdline::new("kind", ["get", "nodes", "--name", cluster]) }
}

/// `kind get kubeconfig --internal --name CLUSTER`: the API server as the nodes reach it.
#[must_use]
pub fn kind_get_internal_kubeconfig(engine: Engine, cluster: &str) -> Cmdline {
    Cmdline { env: engine.kind_env(), ..Cmdline::new("kind", ["get", "kubeconfig", "--internal", "--name", cluster]) }
}

/// `ENGINE exec [-it] NODE sh -c SCRIPT [ARGS...]`.
fn exec_sh(engine: Engine, node: &str, interactive: bool, script: &str, args: &[&str]) -> Cmdline {
    let mut words = vec!["exec"];
    if interactive {
        words.push("-it");
    }
    words.extend([node, "sh", "-c", script]);
    words.extend(args);
    Cmdline::new(engine.program(), words)
}

/// Fails if an agent started by `cargo xtask run` still runs in the node, then mounts a bpffs
/// on /sys/fs/bpf unless one is there.
#[must_use]
pub fn prepare_node(engine: Engine, node: &str) -> Cmdline {
    let script = format!(
        "if [ -f {NODE_PIDFILE} ] && grep -qx rproxy-agent \"/proc/$(cat {NODE_PIDFILE})/comm\" 2>/dev/null; then \
         echo \"rproxy-agent already runs in this node (pid $(cat {NODE_PIDFILE}))\" >&2; exit 1; fi; \
         if [ \"$(stat -f -c %T /sys/fs/bpf)\" != bpf_fs ]; then mount -t bpf bpf /sys/fs/bpf; fi"
    );
    exec_sh(engine, node, false, &script, &[])
}

/// `ENGINE cp BIN NODE:/usr/local/bin/rproxy-agent`.
#[must_use]
pub fn copy_agent(engine: Engine, bin: &str, node: &str) -> Cmdline {
    Cmdline::new(engine.program(), ["cp", bin, &format!("{node}:{NODE_AGENT}")])
}

/// Writes its stdin to [`NODE_KUBECONFIG`] in the node, readable by root only.
#[must_use]
pub fn install_kubeconfig(engine: Engine, node: &str) -> Cmdline {
    let dir = Path::new(NODE_KUBECONFIG).parent().and_then(Path::to_str).unwrap_or("/");
    let script = format!("umask 077 && mkdir -p {dir} && cat > {NODE_KUBECONFIG}");
    Cmdline::new(engine.program(), ["exec", "-i", node, "sh", "-c", &script])
}

/// The agent's own command line in the node.
#[must_use]
pub fn agent_args(node: &str, pod_devices: &str, devices: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        NODE_AGENT,
        "run",
        "--kubeconfig",
        NODE_KUBECONFIG,
        "--node-name",
        node,
        "--pod-devices",
        pod_devices,
        "--bpffs",
        NODE_BPFFS,
    ]
    .map(str::to_owned)
    .to_vec();
    if !devices.trim().is_empty() {
        args.extend(["--devices".to_owned(), devices.to_owned()]);
    }
    args
}

/// `rproxy-agent run` in the node, in the foreground: the shell records its pid in
/// [`NODE_PIDFILE`] and execs the agent (so the pid is the agent's). `devices`: its
/// `--pod-devices` and `--devices`. With `tty`, `-it` makes Ctrl-C reach the agent. `log` is
/// passed on as `RPROXY_LOG`.
#[must_use]
pub fn run_agent(engine: Engine, node: &str, devices: (&str, &str), tty: bool, log: Option<&str>) -> Cmdline {
    let mut words: Vec<String> = vec!["exec".into()];
    if tty {
        words.push("-it".into());
    }
    if let Some(level) = log {
        words.extend(["-e".into(), format!("RPROXY_LOG={level}")]);
    }
    words.extend([node.into(), "sh".into(), "-c".into(), format!("echo $$ > {NODE_PIDFILE} && exec \"$@\"")]);
    words.push("rproxy-agent".into()); // $0 of the script
    words.extend(agent_args(node, devices.0, devices.1));
    Cmdline::new(engine.program(), words)
}

/// Sends SIGTERM to the agent [`run_agent`] started.
#[must_use]
pub fn stop_agent(engine: Engine, node: &str) -> Cmdline {
    exec_sh(engine, node, false, &format!("kill -TERM \"$(cat {NODE_PIDFILE})\""), &[])
}

/// `ENGINE exec NODE rproxy-agent dump|cleanup --bpffs ...`: how to look at or remove the datapath.
#[must_use]
pub fn agent_tool(engine: Engine, node: &str, subcommand: &str) -> Cmdline {
    Cmdline::new(engine.program(), ["exec", node, NODE_AGENT, subcommand, "--bpffs", NODE_BPFFS])
}

/// The steps before the agent starts, in order.
#[must_use]
pub fn setup_steps(args: &RunArgs, bin: &str, node: &str) -> Vec<Step> {
    let engine = args.engine;
    vec![
        Step::Run { what: "check the node and mount a bpffs in it if needed", cmd: prepare_node(engine, node) },
        Step::Run { what: "copy the agent into the node", cmd: copy_agent(engine, bin, node) },
        Step::Pipe {
            what: "the cluster's internal kubeconfig into the node",
            from: kind_get_internal_kubeconfig(engine, &args.cluster),
            to: install_kubeconfig(engine, node),
        },
    ]
}

/// What to run while or after the agent runs.
#[must_use]
pub fn hints(engine: Engine, node: &str) -> String {
    format!(
        "Inspect the maps:       {}\n\
         The datapath stays after the agent exits (Ctrl-C); remove it with:\n                        {}",
        agent_tool(engine, node, "dump"),
        agent_tool(engine, node, "cleanup")
    )
}

/// The whole `--dry-run` output.
#[must_use]
pub fn dry_run_script(args: &RunArgs, bin: &str, tty: bool, log: Option<&str>) -> String {
    let node = args.node.as_deref().unwrap_or(NODE_PLACEHOLDER);
    let mut out = vec!["# build the agent\ncargo xtask build".to_owned()];
    let list = kind_get_nodes(args.engine, &args.cluster);
    out.push(match &args.node {
        Some(n) => format!("# {n} must be one of\n{list}"),
        None => format!("# {NODE_PLACEHOLDER}: the first worker in\n{list}\n# else the control plane"),
    });
    out.extend(setup_steps(args, bin, node).iter().map(ToString::to_string));
    out.push(format!(
        "# run the agent (Ctrl-C stops it)\n{}",
        run_agent(args.engine, node, (&args.pod_devices, &args.devices), tty, log)
    ));
    out.join("\n")
}

/// `cargo xtask run`. `bin` is the release agent that `build` produces.
pub fn run(args: &RunArgs, bin: &Path, build: impl FnOnce() -> Result<()>) -> Result<()> {
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let log = std::env::var("RPROXY_LOG").ok();
    let bin_str = bin.to_str().with_context(|| format!("{} is not UTF-8", bin.display()))?;
    if args.dry_run {
        println!("{}", dry_run_script(args, bin_str, tty, log.as_deref()));
        return Ok(());
    }
    build()?;
    let listing = output(&kind_get_nodes(args.engine, &args.cluster))?;
    let node = choose_node(&args.cluster, &listing, args.node.as_deref())?;
    eprintln!("running rproxy-agent on kind node {node}");
    for step in setup_steps(args, bin_str, &node) {
        execute(&step)?;
    }
    eprintln!("{}", hints(args.engine, &node));
    let status = foreground(
        &run_agent(args.engine, &node, (&args.pod_devices, &args.devices), tty, log.as_deref()),
        &stop_agent(args.engine, &node),
        tty,
    )?;
    eprintln!("rproxy-agent exited ({status}).\n{}", hints(args.engine, &node));
    if !status.success() {
        bail!("rproxy-agent on {node} failed: {status}");
    }
    Ok(())
}

fn spawn_error(cmd: &Cmdline, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("`{}` not found in PATH (cargo xtask run needs kind, and docker or podman)", cmd.program)
    } else {
        anyhow::Error::new(e).context(format!("running {cmd}"))
    }
}

fn check(cmd: &Cmdline, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{cmd}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout (its stderr goes to ours).
fn output(cmd: &Cmdline) -> Result<String> {
    eprintln!("+ {cmd}");
    let out = cmd.command().stderr(Stdio::inherit()).output().map_err(|e| spawn_error(cmd, e))?;
    check(cmd, out.status)?;
    String::from_utf8(out.stdout).with_context(|| format!("`{cmd}` printed non-UTF-8"))
}

fn execute(step: &Step) -> Result<()> {
    match step {
        Step::Run { cmd, .. } => {
            eprintln!("+ {cmd}");
            check(cmd, cmd.command().status().map_err(|e| spawn_error(cmd, e))?)
        }
        Step::Pipe { from, to, .. } => {
            // The kubeconfig holds credentials: through memory, not a file, and not echoed.
            let data = output(from)?;
            eprintln!("+ {to}  (stdin: the output above)");
            let mut child = to.command().stdin(Stdio::piped()).spawn().map_err(|e| spawn_error(to, e))?;
            child.stdin.take().context("stdin")?.write_all(data.as_bytes())?;
            check(to, child.wait()?)
        }
    }
}

/// Runs the agent's `exec` until it ends. A SIGINT or SIGTERM here runs `stop` (which reaches the
/// agent whether or not `docker exec` forwards signals). Without `tty`, the `exec` runs in its own
/// process group so that a terminal's Ctrl-C goes only to us; with one, `docker exec -it` puts
/// the terminal in raw mode and Ctrl-C reaches the agent through its pty.
fn foreground(cmd: &Cmdline, stop: &Cmdline, tty: bool) -> Result<ExitStatus> {
    use std::os::unix::process::CommandExt as _;
    let stop_requested = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop_requested)).context("installing a signal handler")?;
    }
    eprintln!("+ {cmd}");
    let mut command = cmd.command();
    if !tty {
        command.process_group(0);
    }
    let mut child = command.spawn().map_err(|e| spawn_error(cmd, e))?;
    let mut stopped = false;
    loop {
        if !stopped && stop_requested.load(Ordering::Relaxed) {
            stopped = true;
            eprintln!("stopping rproxy-agent\n+ {stop}");
            match stop.command().status() {
                Ok(status) if !status.success() => eprintln!("`{stop}` failed: {status}"),
                Ok(_) => {}
                Err(e) => eprintln!("`{stop}`: {e}"),
            }
        }
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            cluster: "kind".into(),
            node: None,
            engine: Engine::Docker,
            pod_devices: DEFAULT_POD_DEVICES.into(),
            devices: DEFAULT_DEVICES.into(),
            dry_run: false,
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn options_default_as_documented() {
        let parsed = Cli::try_parse_from(["run"]).expect("no option is required").run;
        assert_eq!(parsed, args());
        let parsed = Cli::try_parse_from([
            "run",
            "--cluster",
            "dev",
            "--node",
            "dev-worker2",
            "--engine",
            "podman",
            "--pod-devices",
            "eth*",
            "--devices",
            "",
            "--dry-run",
        ])
        .expect("valid options")
        .run;
        let expected = RunArgs {
            cluster: "dev".into(),
            node: Some("dev-worker2".into()),
            engine: Engine::Podman,
            pod_devices: "eth*".into(),
            devices: String::new(),
            dry_run: true,
        };
        assert_eq!(parsed, expected);
        assert!(Cli::try_parse_from(["run", "--engine", "lxc"]).is_err());
    }

    #[test]
    fn roles_come_from_kind_container_names() {
        assert_eq!(node_role("kind", "kind-control-plane"), Some((Role::ControlPlane, 1)));
        assert_eq!(node_role("kind", "kind-control-plane3"), Some((Role::ControlPlane, 3)));
        assert_eq!(node_role("kind", "kind-worker"), Some((Role::Worker, 1)));
        assert_eq!(node_role("kind", "kind-worker12"), Some((Role::Worker, 12)));
        assert_eq!(node_role("my-cluster", "my-cluster-worker"), Some((Role::Worker, 1)));
        // Not Kubernetes nodes, or not this cluster's.
        assert_eq!(node_role("kind", "kind-external-load-balancer"), None);
        assert_eq!(node_role("kind", "other-worker"), None);
        assert_eq!(node_role("kind", "kindx-worker"), None);
        assert_eq!(node_role("kind", "kind-workerx"), None);
        assert_eq!(node_role("kind", "kind-worker1"), None);
        assert_eq!(node_role("kind", ""), None);
    }

    #[test]
    fn the_first_worker_is_chosen_in_numeric_order() {
        let listing = "kind-worker10\nkind-control-plane\nkind-worker2\nkind-external-load-balancer\nkind-worker\n";
        assert_eq!(choose_node("kind", listing, None).unwrap(), "kind-worker");
        let listing = "kind-worker10\nkind-worker3\n";
        assert_eq!(choose_node("kind", listing, None).unwrap(), "kind-worker3");
    }

    #[test]
    fn without_workers_the_control_plane_is_chosen() {
        let listing = "kind-external-load-balancer\nkind-control-plane2\nkind-control-plane\n";
        assert_eq!(choose_node("kind", listing, None).unwrap(), "kind-control-plane");
        assert_eq!(choose_node("dev", "  dev-control-plane  \n\n", None).unwrap(), "dev-control-plane");
    }

    #[test]
    fn a_requested_node_must_belong_to_the_cluster() {
        let listing = "kind-control-plane\nkind-worker\nkind-worker2\n";
        assert_eq!(choose_node("kind", listing, Some("kind-worker2")).unwrap(), "kind-worker2");
        assert_eq!(choose_node("kind", listing, Some("kind-control-plane")).unwrap(), "kind-control-plane");
        let err = choose_node("kind", listing, Some("kind-worker3")).unwrap_err().to_string();
        assert!(err.contains("its nodes: kind-worker, kind-worker2, kind-control-plane"), "{err}");
        let lb = "kind-control-plane\nkind-external-load-balancer\n";
        assert!(choose_node("kind", lb, Some("kind-external-load-balancer")).is_err());
    }

    #[test]
    fn an_empty_cluster_is_an_error() {
        let err = choose_node("kind", "", None).unwrap_err().to_string();
        assert!(err.contains("kind create cluster --name kind"), "{err}");
        assert!(choose_node("kind", "other-worker\n", Some("other-worker")).is_err());
    }

    #[test]
    fn kind_commands_select_the_engine() {
        let docker = kind_get_nodes(Engine::Docker, "dev");
        assert_eq!((docker.program.as_str(), docker.env.as_slice()), ("kind", &[][..]));
        assert_eq!(docker.args, ["get", "nodes", "--name", "dev"]);
        let podman = kind_get_internal_kubeconfig(Engine::Podman, "dev");
        assert_eq!(podman.env, [("KIND_EXPERIMENTAL_PROVIDER".to_owned(), "podman".to_owned())]);
        assert_eq!(podman.args, ["get", "kubeconfig", "--internal", "--name", "dev"]);
        assert_eq!(podman.to_string(), "KIND_EXPERIMENTAL_PROVIDER=podman kind get kubeconfig --internal --name dev");
        assert_eq!(copy_agent(Engine::Podman, "/b/rproxy-agent", "dev-worker").program, "podman");
    }

    #[test]
    fn the_agent_runs_against_the_kubeconfig_in_the_node() {
        let cmd = run_agent(Engine::Docker, "kind-worker", ("veth*", "eth0"), false, None);
        assert_eq!(cmd.program, "docker");
        let (exec, agent) = cmd.args.split_at(5);
        assert_eq!(exec, ["exec", "kind-worker", "sh", "-c", "echo $$ > /run/rproxy-agent.pid && exec \"$@\""]);
        assert_eq!(
            agent,
            [
                "rproxy-agent",
                "/usr/local/bin/rproxy-agent",
                "run",
                "--kubeconfig",
                "/etc/rproxy/kubeconfig",
                "--node-name",
                "kind-worker",
                "--pod-devices",
                "veth*",
                "--bpffs",
                "/sys/fs/bpf/rproxy",
                "--devices",
                "eth0"
            ]
        );
        // No external device: no --devices.
        let cmd = run_agent(Engine::Docker, "kind-worker", ("veth*", " "), false, None);
        assert!(!cmd.args.contains(&"--devices".to_owned()), "{:?}", cmd.args);
    }

    #[test]
    fn a_terminal_gets_a_pty_and_the_log_level_is_passed_on() {
        let cmd = run_agent(Engine::Podman, "kind-worker", ("veth*", "eth0"), true, Some("debug"));
        assert_eq!(cmd.program, "podman");
        assert_eq!(cmd.args[..5], ["exec", "-it", "-e", "RPROXY_LOG=debug", "kind-worker"]);
    }

    #[test]
    fn stop_signals_the_recorded_pid() {
        let cmd = stop_agent(Engine::Docker, "kind-worker");
        assert_eq!(cmd.args, ["exec", "kind-worker", "sh", "-c", "kill -TERM \"$(cat /run/rproxy-agent.pid)\""]);
    }

    #[test]
    fn setup_prepares_copies_then_installs_the_kubeconfig() {
        let a = RunArgs { cluster: "dev".into(), ..args() };
        let steps = setup_steps(&a, "/t/release/rproxy-agent", "dev-worker");
        let [Step::Run { cmd: prepare, .. }, Step::Run { cmd: copy, .. }, Step::Pipe { from, to, .. }] = &steps[..]
        else {
            panic!("unexpected plan: {steps:?}");
        };
        assert_eq!(prepare.args[..4], ["exec", "dev-worker", "sh", "-c"]);
        assert!(prepare.args[4].contains("mount -t bpf bpf /sys/fs/bpf"));
        assert_eq!(copy.args, ["cp", "/t/release/rproxy-agent", "dev-worker:/usr/local/bin/rproxy-agent"]);
        assert_eq!(*from, kind_get_internal_kubeconfig(Engine::Docker, "dev"));
        assert_eq!(
            to.args,
            [
                "exec",
                "-i",
                "dev-worker",
                "sh",
                "-c",
                "umask 077 && mkdir -p /etc/rproxy && cat > /etc/rproxy/kubeconfig"
            ]
        );
    }

    /// The scripts given to `sh -c` in the node parse (`sh -n`).
    #[test]
    fn node_scripts_are_valid_shell() {
        let scripts = [
            prepare_node(Engine::Docker, "n"),
            install_kubeconfig(Engine::Docker, "n"),
            stop_agent(Engine::Docker, "n"),
            run_agent(Engine::Docker, "n", ("veth*", "eth0"), false, None),
        ]
        .map(|cmd| {
            let at = cmd.args.iter().position(|a| a == "-c").expect("sh -c") + 1;
            cmd.args[at].clone()
        });
        for script in scripts {
            let status = Command::new("sh").args(["-n", "-c", &script]).status().expect("running sh");
            assert!(status.success(), "sh -n rejects: {script}");
        }
    }

    /// The bpffs test of `prepare_node` answers "already a bpffs" for a bpffs and "mount one"
    /// for a sysfs, run against this machine's /sys/fs/bpf and /sys.
    #[test]
    fn bpffs_detection_tells_bpffs_from_sysfs() {
        let probe = |dir: &str| {
            let script = format!("[ \"$(stat -f -c %T {dir})\" != bpf_fs ]");
            Command::new("sh").args(["-c", &script]).status().expect("running sh").success()
        };
        assert!(probe("/sys"), "/sys is no bpffs, so a mount would be attempted");
        if Command::new("sh").args(["-c", "mount | grep -q ' /sys/fs/bpf type bpf'"]).status().unwrap().success() {
            assert!(!probe("/sys/fs/bpf"), "/sys/fs/bpf is a bpffs here, so no mount would be attempted");
        }
        assert!(prepare_node(Engine::Docker, "n").args[4].contains("[ \"$(stat -f -c %T /sys/fs/bpf)\" != bpf_fs ]"));
    }

    #[test]
    fn shell_rendering_quotes_what_needs_it() {
        let cmd = run_agent(Engine::Docker, "kind-worker", ("veth*,cali*", "eth0"), false, None);
        let text = cmd.to_string();
        assert!(
            text.starts_with("docker exec kind-worker sh -c 'echo $$ > /run/rproxy-agent.pid && exec \"$@\"' "),
            "{text}"
        );
        assert!(text.ends_with("--pod-devices 'veth*,cali*' --bpffs /sys/fs/bpf/rproxy --devices eth0"), "{text}");
        // What the shell makes of it is the argument list itself.
        assert_eq!(
            shlex::split(&text).expect("valid shell words"),
            [&["docker"][..], &cmd.args.iter().map(String::as_str).collect::<Vec<_>>()].concat()
        );
    }

    #[test]
    fn dry_run_prints_every_step_in_order() {
        let a = RunArgs { node: Some("kind-worker2".into()), ..args() };
        let text = dry_run_script(&a, "/t/rproxy-agent", false, None);
        let order = [
            "cargo xtask build",
            "kind get nodes --name kind",
            "docker exec kind-worker2 sh -c",
            "docker cp /t/rproxy-agent kind-worker2:/usr/local/bin/rproxy-agent",
            "kind get kubeconfig --internal --name kind | docker exec -i kind-worker2 sh -c",
            "docker exec kind-worker2 sh -c 'echo $$",
        ];
        let positions: Vec<_> =
            order.iter().map(|s| text.find(s).unwrap_or_else(|| panic!("{s:?} missing:\n{text}"))).collect();
        assert!(positions.is_sorted(), "out of order:\n{text}");
        let placeholder = dry_run_script(&args(), "/t/rproxy-agent", true, None);
        assert!(placeholder.contains("docker exec -it NODE sh -c"), "{placeholder}");
        assert!(placeholder.contains("# NODE: the first worker in"), "{placeholder}");
    }

    #[test]
    fn hints_name_dump_and_cleanup_in_the_node() {
        let text = hints(Engine::Docker, "kind-worker");
        assert!(text.contains("docker exec kind-worker /usr/local/bin/rproxy-agent dump --bpffs /sys/fs/bpf/rproxy"));
        assert!(
            text.contains("docker exec kind-worker /usr/local/bin/rproxy-agent cleanup --bpffs /sys/fs/bpf/rproxy")
        );
    }
}

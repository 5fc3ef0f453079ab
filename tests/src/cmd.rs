//! Running external commands (`ip`, the agent's `cleanup`, `iptables-restore`, `nft`) with their
//! exit status checked.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs `cmd` to completion; fails with the command line, the exit status and its stderr unless
/// it exits 0. Returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`] with `input` written to the command's stdin.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let written = child.stdin.take().context("stdin")?.write_all(input.as_bytes());
    let out = child.wait_with_output().with_context(|| format!("waiting for {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    written.with_context(|| format!("writing the input of {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n <ns>] <args>`.
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    run(cmd.args(args))
}

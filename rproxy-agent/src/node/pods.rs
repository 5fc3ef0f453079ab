//! `--pod-sockets`: whose TCP connections to services the socket hooks translate at
//! `connect()` besides the node's own (`rproxy_common::CONFIG_F_POD_SOCKETS`,
//! `CONFIG_F_POD_NETNS_LISTED`).
//!
//! On a node every network namespace but the node's is a pod's (`all`). Where nodes share one
//! kernel and cgroup tree, as in the netns lab, a node's pods are named by their namespace files
//! instead (a glob such as `/run/netns/lab-n1-*`, the bind mounts `ip netns` and CNIs make):
//! [`PodNetns`] reads the directory whenever the agent looks at its devices (a pod's namespace
//! exists before its device appears on the node) and keeps the set of their cookies, which the
//! agent writes to `RPX_POD_NETNS`. A connection made before its namespace is listed is
//! translated on the pod's device, as with `none`: listing late costs speed, never correctness.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use globset::{Glob, GlobMatcher};
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// `--pod-sockets`.
#[derive(Clone, Debug)]
pub enum PodSockets {
    /// Every network namespace but the agent's.
    All,
    /// None: pods' connections are translated on their devices.
    Off,
    /// The namespaces whose files match.
    Listed(NetnsGlob),
}

impl PodSockets {
    /// `all`, `none`, or an absolute path whose last component is a glob.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "all" => Ok(Self::All),
            "none" => Ok(Self::Off),
            _ => NetnsGlob::parse(text).map(Self::Listed),
        }
    }
}

impl std::fmt::Display for PodSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Off => f.write_str("none"),
            Self::Listed(g) => f.write_str(g.as_str()),
        }
    }
}

/// Namespace files: a directory and a glob over the names in it.
#[derive(Clone, Debug)]
pub struct NetnsGlob {
    dir: PathBuf,
    names: GlobMatcher,
    text: String,
}

impl NetnsGlob {
    fn parse(text: &str) -> Result<Self> {
        let usage = |why: &str| Error::Usage(format!("--pod-sockets {text:?}: {why}"));
        let path = Path::new(text);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
            return Err(usage("expected 'all', 'none' or a path such as /run/netns/lab-n1-*"));
        };
        if !path.is_absolute() {
            return Err(usage("the namespace files' path must be absolute"));
        }
        if dir.to_str().is_some_and(|d| d.contains(['*', '?', '[', '{'])) {
            return Err(usage("only the file name may be a glob"));
        }
        let names = Glob::new(name).map_err(|e| usage(&format!("invalid glob: {e}")))?.compile_matcher();
        Ok(Self { dir: dir.to_owned(), names, text: text.to_owned() })
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The pods' namespaces found so far under `--pod-sockets <glob>`.
pub struct PodNetns {
    glob: NetnsGlob,
    /// Namespace (the inode of its nsfs file) → cookie.
    known: BTreeMap<u64, u64>,
    /// The last scan's failure, if it failed.
    failure: Option<String>,
    /// Namespaces (inode) whose cookie could not be read, with why: tried again at every
    /// scan, warned about once (again if the reason changes).
    unreadable: BTreeMap<u64, String>,
    /// `known` differs from what `RPX_POD_NETNS` was last written with (at first: whatever an
    /// earlier run left), until [`PodNetns::written`].
    unwritten: bool,
}

impl PodNetns {
    #[must_use]
    pub fn new(glob: NetnsGlob) -> Self {
        Self { glob, known: BTreeMap::new(), failure: None, unreadable: BTreeMap::new(), unwritten: true }
    }

    /// The set the last [`PodNetns::scan`] returned is in `RPX_POD_NETNS`.
    pub fn written(&mut self) {
        self.unwritten = false;
    }

    /// Records that a scan failed with `why`; `true` if that is news (the last scan did not
    /// fail so), to be logged.
    pub fn failed(&mut self, why: &str) -> bool {
        self.failure.replace(why.to_owned()).is_none_or(|last| last != why)
    }

    /// Reads the directory. `Some(cookies)`: the whole set, to be written, because it changed or
    /// was not written yet (the first scan; a write that failed). A file whose namespace cannot
    /// be entered is left out (and tried again at the next scan), warned about once.
    pub fn scan(&mut self) -> Result<Option<BTreeSet<u64>>> {
        let dir = &self.glob.dir;
        let entries = std::fs::read_dir(dir)
            .map_err(|source| Error::Io { what: format!("reading {} (--pod-sockets)", dir.display()), source })?;
        if self.failure.take().is_some() {
            info!(dir = %dir.display(), "pod network namespaces readable again");
        }
        let mut found = BTreeMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| self.glob.names.is_match(n)) {
                continue;
            }
            let path = entry.path();
            // A namespace's file is a bind mount of its nsfs inode: the same inode whatever its name.
            match std::fs::metadata(&path) {
                Ok(meta) => {
                    found.insert(meta.ino(), path);
                }
                Err(e) => debug!(path = %path.display(), error = %e, "namespace file gone while reading"),
            }
        }
        let (new, gone) = plan(&found, &self.known);
        self.unwritten |= !gone.is_empty();
        for ino in gone {
            self.known.remove(&ino);
        }
        self.unreadable.retain(|ino, _| found.contains_key(ino));
        for (ino, path) in new {
            match cookie_of(path) {
                Ok(cookie) => {
                    if self.unreadable.remove(&ino).is_some() {
                        info!(path = %path.display(), cookie, "pod network namespace readable now, listed");
                    } else {
                        debug!(path = %path.display(), cookie, "pod network namespace listed");
                    }
                    self.known.insert(ino, cookie);
                    self.unwritten = true;
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.unreadable.insert(ino, why.clone()).is_none_or(|last| last != why) {
                        warn!(
                            path = %path.display(), error = %why,
                            "pod network namespace not listed: its TCP connections are translated on its device"
                        );
                    } else {
                        debug!(path = %path.display(), error = %why, "pod network namespace still not readable");
                    }
                }
            }
        }
        Ok(self.unwritten.then(|| self.known.values().copied().collect()))
    }
}

/// Which of the namespaces `found` (inode → file) are new, and which `known` ones are gone.
fn plan<'a>(found: &'a BTreeMap<u64, PathBuf>, known: &BTreeMap<u64, u64>) -> (Vec<(u64, &'a Path)>, Vec<u64>) {
    let new = found.iter().filter(|(ino, _)| !known.contains_key(ino)).map(|(&ino, p)| (ino, p.as_path())).collect();
    let gone = known.keys().filter(|ino| !found.contains_key(ino)).copied().collect();
    (new, gone)
}

/// The cookie of the network namespace bound at `path`: read from a socket made on a thread
/// that has joined it (the agent's own threads stay where they are).
fn cookie_of(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(|source| Error::Io { what: format!("opening {}", path.display()), source })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|errno| Error::Io {
                what: format!("entering network namespace {}", path.display()),
                source: errno.into(),
            })?;
            crate::bpf::datapath::netns_cookie()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_all_none_or_an_absolute_glob_over_file_names() {
        assert!(matches!(PodSockets::parse("all"), Ok(PodSockets::All)));
        assert!(matches!(PodSockets::parse("none"), Ok(PodSockets::Off)));
        let Ok(PodSockets::Listed(g)) = PodSockets::parse("/run/netns/lab-n1-*") else { panic!("a glob") };
        assert_eq!(g.dir, Path::new("/run/netns"));
        assert!(g.names.is_match("lab-n1-client"));
        assert!(!g.names.is_match("lab-n10-client"), "the other node's pods");
        assert_eq!(g.as_str(), "/run/netns/lab-n1-*");
        for bad in ["lab-*", "/run/*/pod", "/", "", "/run/netns/[", "All"] {
            let err = PodSockets::parse(bad).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains("--pod-sockets")), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn a_failing_scan_is_news_once_until_it_changes() {
        let PodSockets::Listed(glob) = PodSockets::parse("/run/netns/x-*").unwrap() else { panic!("a glob") };
        let mut pods = PodNetns::new(glob);
        assert!(pods.failed("gone"));
        assert!(!pods.failed("gone"), "the same failure again");
        assert!(pods.failed("denied"), "another one");
    }

    #[test]
    fn a_scan_hands_the_set_out_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("other-pod"), "").unwrap();
        let glob = format!("{}/lab-n1-*", dir.path().display());
        let PodSockets::Listed(glob) = PodSockets::parse(&glob).unwrap() else { panic!("a glob") };
        let mut pods = PodNetns::new(glob);
        assert_eq!(pods.scan().unwrap(), Some(BTreeSet::new()), "the first scan replaces what was there");
        assert_eq!(pods.scan().unwrap(), Some(BTreeSet::new()), "not written yet (a failed write)");
        pods.written();
        assert_eq!(pods.scan().unwrap(), None, "written and unchanged");
    }

    #[test]
    fn an_unreadable_namespace_file_is_left_out_without_rewriting_the_set() {
        let dir = tempfile::tempdir().unwrap();
        // Not an nsfs file: entering it fails.
        let file = dir.path().join("lab-n1-broken");
        std::fs::write(&file, "").unwrap();
        let glob = format!("{}/lab-n1-*", dir.path().display());
        let PodSockets::Listed(glob) = PodSockets::parse(&glob).unwrap() else { panic!("a glob") };
        let mut pods = PodNetns::new(glob);
        assert_eq!(pods.scan().unwrap(), Some(BTreeSet::new()), "the first scan replaces what was there");
        assert_eq!(pods.unreadable.len(), 1, "{:?}", pods.unreadable);
        pods.written();
        assert_eq!(pods.scan().unwrap(), None, "still unreadable: nothing new to write");
        assert_eq!(pods.unreadable.len(), 1);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(pods.scan().unwrap(), None);
        assert!(pods.unreadable.is_empty(), "a file that is gone is forgotten");
    }

    #[test]
    fn a_scan_lists_new_namespaces_and_forgets_gone_ones() {
        let found: BTreeMap<u64, PathBuf> =
            [(10, PathBuf::from("/run/netns/a")), (11, PathBuf::from("/run/netns/b"))].into();
        let known: BTreeMap<u64, u64> = [(11, 1011), (12, 1012)].into();
        let (new, gone) = plan(&found, &known);
        assert_eq!(new, [(10, Path::new("/run/netns/a"))]);
        assert_eq!(gone, [12]);
        let none = BTreeMap::new();
        let (new, gone) = plan(&none, &BTreeMap::new());
        assert!(new.is_empty() && gone.is_empty());
    }
}

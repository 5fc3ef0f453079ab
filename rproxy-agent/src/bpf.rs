//! The kernel side as the agent sees it: loading the eBPF object, its pinned maps and links, and
//! attaching its programs (`datapath`); the conntrack garbage collector (`gc`); and `dump`, the
//! maps in human form.
pub mod datapath;
pub mod dump;
pub mod gc;

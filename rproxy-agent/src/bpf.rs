//! The kernel side as the agent sees it: loading the eBPF object, its pinned maps and links, and
//! attaching its programs (`datapath`); the conntrack garbage collector (`gc`); `dump`, the
//! maps in human form; `monitor`, the
//! drops and translations as they happen; `explain`, what the datapath would do with a packet; and `migrate`, from maps without BTF to maps with it.
pub mod batch;
pub mod datapath;
pub mod dump;
pub mod explain;
pub mod gc;
pub mod migrate;
pub mod monitor;

//! The datapath's packet tests, one test binary: real packets through the real programs with
//! `BPF_PROG_TEST_RUN`. `packets`: the pod path (`rpx_from_pod`, `rpx_to_pod`); `north_south`:
//! the external devices' programs, in a private network namespace with a real FIB. Each
//! behaviour runs for both families (`<module>::<behaviour>::ipv4`, `::ipv6`).
#[path = "../common/mod.rs"]
mod common;
mod devlog;
mod fuzz;
mod north_south;
mod packets;
mod pressure;

//! This node's side: its devices (pod interfaces, the external `--devices` and their
//! addresses: `devices`), the north-south programs on the external devices (`external`), the
//! pods whose sockets the socket hooks serve (`pods`), and the SNAT port range checked against
//! the node's own ephemeral ports (`snat`).
pub mod devices;
pub mod external;
pub mod pods;
pub mod snat;

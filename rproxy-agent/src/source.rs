//! What sources (the manifests directory, the Kubernetes API) tell the agent. Both feed the same
//! [`crate::store::Store`], which translates and writes only what changed.
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

/// One change reported by a source.
#[derive(Clone, Debug)]
pub enum Update {
    /// The complete set of Services (an initial list, a relist, a manifests reload): every Service
    /// not in it is gone.
    ResetServices(Vec<Service>),
    /// The complete set of `EndpointSlices`, as [`Update::ResetServices`].
    ResetSlices(Vec<EndpointSlice>),
    ApplyService(Box<Service>),
    DeleteService(Box<Service>),
    ApplySlice(Box<EndpointSlice>),
    DeleteSlice(Box<EndpointSlice>),
    /// This node's Node object (`None`: deleted or not found).
    Node(Option<Box<Node>>),
    /// A watch finished its initial list (`"Service"`, `"EndpointSlice"` or `"Node"`).
    Synced(&'static str),
}

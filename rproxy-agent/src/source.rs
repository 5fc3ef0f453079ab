//! What sources (the manifests directory, the Kubernetes API) tell the agent. Both feed the same
//! [`crate::store::Store`], which translates and writes only what changed.
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

/// One change reported by a source.
///
/// A complete set of one kind (an initial list, a relist) comes either whole, as
/// [`Update::ResetServices`] or [`Update::ResetSlices`], or streamed: [`Update::ListStart`], the
/// objects one by one ([`Update::ListedService`], [`Update::ListedSlice`], [`Update::ListedNode`]),
/// then [`Update::ListDone`]. Streamed, a list of thousands of objects never sits in memory in
/// full: the store keeps each listed object in its own compact form as it comes, and replaces its
/// current set with the listed one, all at once, at `ListDone`.
#[derive(Clone, Debug)]
pub enum Update {
    /// The complete set of Services (a manifests reload): every Service not in it is gone.
    ResetServices(Vec<Service>),
    /// The complete set of `EndpointSlices`, as [`Update::ResetServices`].
    ResetSlices(Vec<EndpointSlice>),
    /// A list of one kind (`"Service"`, `"EndpointSlice"` or `"Node"`) begins. A new `ListStart`
    /// of the same kind before its `ListDone` drops what was listed so far (a list that failed
    /// half-way and starts over).
    ListStart(&'static str),
    /// One Service of the list in progress.
    ListedService(Box<Service>),
    /// One `EndpointSlice` of the list in progress.
    ListedSlice(Box<EndpointSlice>),
    /// This node's Node object, listed.
    ListedNode(Box<Node>),
    /// The list of this kind is complete: the objects listed since its `ListStart` replace the
    /// ones held, and every object of this kind not listed is gone.
    ListDone(&'static str),
    ApplyService(Box<Service>),
    DeleteService(Box<Service>),
    ApplySlice(Box<EndpointSlice>),
    DeleteSlice(Box<EndpointSlice>),
    /// This node's Node object (`None`: deleted or not found).
    Node(Option<Box<Node>>),
    /// A watch finished its initial list (`"Service"`, `"EndpointSlice"` or `"Node"`).
    Synced(&'static str),
}

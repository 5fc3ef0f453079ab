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
    /// The watch of this kind broke (the API server unreachable, the watch expired…): it will
    /// list again, and what the agent holds of this kind may be behind until that list's
    /// [`Update::ListDone`]. See [`ResyncGate`].
    WatchLost(&'static str),
}

/// Keeps Services and their `EndpointSlices` from being written half-way after a watch broke.
///
/// When the API server comes back after an outage, each kind relists on its own: applying the
/// Services' list before the slices' would program a Service created meanwhile with no backend,
/// and it would refuse connections until the slices arrive. So while a kind is relisting
/// ([`Update::WatchLost`] until its [`Update::ListDone`]), changes are held, and written once
/// every lost kind has relisted; but never held longer than [`ResyncGate::HOLD_MAX`] from the
/// first held change, so a watch that stays broken delays the other kind's changes by that
/// much at most, instead of freezing them.
#[derive(Debug, Default)]
pub struct ResyncGate {
    /// Kinds relisting.
    lost: std::collections::BTreeSet<&'static str>,
    /// When the oldest held change came.
    held_since: Option<tokio::time::Instant>,
}

impl ResyncGate {
    /// Longest a change is held for a kind still relisting.
    pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(2);

    /// Takes an update into account (only [`Update::WatchLost`] and [`Update::ListDone`] of
    /// Services and `EndpointSlices` matter).
    pub fn observe(&mut self, update: &Update) {
        match update {
            Update::WatchLost(kind @ ("Service" | "EndpointSlice")) => {
                self.lost.insert(kind);
            }
            Update::ListDone(kind) => {
                self.lost.remove(kind);
            }
            _ => {}
        }
    }

    /// Whether changes ready at `now` must wait: some kind is relisting and the oldest held
    /// change is younger than [`ResyncGate::HOLD_MAX`]. A change that is not held ends the
    /// hold (the next one starts a new one).
    pub fn hold(&mut self, now: tokio::time::Instant) -> bool {
        if self.lost.is_empty() {
            self.held_since = None;
            return false;
        }
        let since = *self.held_since.get_or_insert(now);
        if now.duration_since(since) < Self::HOLD_MAX {
            return true;
        }
        self.held_since = None;
        false
    }

    /// When held changes are written at the latest, if any are held.
    #[must_use]
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.held_since.map(|since| since + Self::HOLD_MAX)
    }

    /// The kinds relisting.
    pub fn relisting(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.lost.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    #[test]
    fn holds_until_every_lost_kind_relisted() {
        let t0 = Instant::now();
        let mut gate = ResyncGate::default();
        assert!(!gate.hold(t0), "nothing lost: nothing held");
        gate.observe(&Update::WatchLost("Service"));
        gate.observe(&Update::WatchLost("EndpointSlice"));
        gate.observe(&Update::WatchLost("Node"));
        assert!(gate.hold(t0));
        assert_eq!(gate.deadline(), Some(t0 + ResyncGate::HOLD_MAX));
        // The Services relisted, the slices not yet: still held.
        gate.observe(&Update::ListDone("Service"));
        assert!(gate.hold(t0 + Duration::from_millis(500)));
        assert_eq!(gate.relisting().collect::<Vec<_>>(), ["EndpointSlice"]);
        // Both relisted: written at once (the Node does not count).
        gate.observe(&Update::ListDone("EndpointSlice"));
        assert!(!gate.hold(t0 + Duration::from_millis(600)));
        assert_eq!(gate.deadline(), None);
    }

    #[test]
    fn a_watch_that_stays_broken_delays_changes_by_hold_max_at_most() {
        let t0 = Instant::now();
        let mut gate = ResyncGate::default();
        gate.observe(&Update::WatchLost("EndpointSlice"));
        assert!(gate.hold(t0));
        assert!(gate.hold(t0 + ResyncGate::HOLD_MAX - Duration::from_millis(1)));
        assert!(!gate.hold(t0 + ResyncGate::HOLD_MAX), "held past HOLD_MAX");
        // The next change starts a new hold.
        let t1 = t0 + Duration::from_secs(5);
        assert!(gate.hold(t1));
        assert_eq!(gate.deadline(), Some(t1 + ResyncGate::HOLD_MAX));
    }
}

#[cfg(test)]
mod fuzz;
pub mod kube;
pub mod manifests;
pub mod slim;

//! The agent's view of the cluster, translated incrementally.
//!
//! Sources report [`Update`]s; the store keeps the objects, marks the Services they touch as
//! dirty, and [`Store::flush`] re-translates only those (each Service with its own
//! `EndpointSlices`, through the same pure [`translate::translate_refs`] the tests exercise) and
//! returns the frontends whose desired state may have changed, for
//! [`crate::writer::Writer::sync_frontends`]. Adding one Service to ten thousand costs one
//! Service's translation and one frontend diff, not a pass over everything.
//!
//! The only coupling between Services is a frontend claimed by two of them: as in
//! [`translate::translate`], the first in `namespace/name` order keeps it and the other gets a
//! problem. Claims are tracked per frontend, so that a conflict is resolved (and its problem
//! cleared) as soon as one claimant goes away.
//!
//! Problems are tracked per Service (and per frontend for conflicts) so that each one is reported
//! once when it appears and once when it is gone.
//!
//! The node's addresses ([`Store::set_node_addresses`]) are an input of the translation too:
//! when they change, every Service with a `nodePort` is re-translated by the next flush. So is
//! the node's zone (its Node's [`ZONE_LABEL`]): when it changes, every Service whose slices carry
//! zone hints is.
//!
//! Memory: Services are kept trimmed and encoded ([`CompactService`]), `EndpointSlices` packed
//! ([`CompactSlice`]); a Service and its slices are rebuilt as API objects only while it is
//! translated. A streamed list ([`Update::ListStart`] … [`Update::ListDone`]) is gathered in the
//! same forms, and replaces the held set of its kind only when complete, so that a relist is
//! applied at once, and its objects never sit in memory as API objects all together.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::IpAddr,
};

use foldhash::{HashMap, HashMapExt as _};
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use tracing::{debug, info};

use crate::{
    model::{self, Desired, Frontend, HealthCheck, NodeContext, ObjectRef, Problem, ServiceEntry},
    source::{
        Update,
        slim::{CompactService, CompactSlice, SliceView},
    },
    translate,
};

/// The Node label naming its zone, which topology hints refer to.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The translated state of one unit: a Service (by `namespace/name`) with its slices, or a
/// slice that names no Service (keyed by the slice itself).
///
/// Small sorted vectors rather than B-trees here and in the claims: most units have one or two
/// frontends, and a one-entry B-tree allocates a whole node (over 1 KiB for these values), which
/// at 10,000 Services is tens of MiB.
#[derive(Debug, Default)]
struct Unit {
    /// Sorted by frontend. The entry of a frontend this unit has (its first claimant) is lent to
    /// the desired state (`None` here): one copy of each entry, not two (18 MiB at 30,000
    /// Services of 10 endpoints). A claimant that loses it gets it back ([`Store::resolve`]).
    frontends: Vec<(Frontend, Option<ServiceEntry>)>,
    /// What most units lack, boxed: a unit is 32 bytes in `Store::units` rather than 96.
    rest: Option<Box<UnitRest>>,
}

#[derive(Debug, Default)]
struct UnitRest {
    health_checks: BTreeMap<ObjectRef, HealthCheck>,
    /// Problems of the unit's own translation, except those of `repeated`.
    problems: Vec<Problem>,
    /// Frontends the unit claims more than once (a Service whose externalIP is its own cluster
    /// IP, a node address that is also its externalIP…), sorted. The translation reports the
    /// second claim against the Service itself; here that problem is a conflict like the others
    /// (see [`Store::resolve`]), since a full translation reports it only while the Service is the
    /// frontend's first claimant.
    repeated: Vec<Frontend>,
}

/// No health checks (a unit without [`UnitRest`]).
static NO_HEALTH_CHECKS: BTreeMap<ObjectRef, HealthCheck> = BTreeMap::new();

impl Unit {
    fn new(
        frontends: Vec<(Frontend, Option<ServiceEntry>)>,
        health_checks: BTreeMap<ObjectRef, HealthCheck>,
        problems: Vec<Problem>,
        repeated: Vec<Frontend>,
    ) -> Self {
        let rest = (!health_checks.is_empty() || !problems.is_empty() || !repeated.is_empty())
            .then(|| Box::new(UnitRest { health_checks, problems, repeated }));
        Self { frontends, rest }
    }

    fn health_checks(&self) -> &BTreeMap<ObjectRef, HealthCheck> {
        self.rest.as_ref().map_or(&NO_HEALTH_CHECKS, |r| &r.health_checks)
    }

    fn problems(&self) -> &[Problem] {
        self.rest.as_ref().map_or(&[], |r| &r.problems)
    }

    fn repeated(&self) -> &[Frontend] {
        self.rest.as_ref().map_or(&[], |r| &r.repeated)
    }
}

/// What a [`Store::flush`] changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Frontends whose desired entry may differ from what the writer holds.
    pub frontends: BTreeSet<Frontend>,
    /// Problems that appeared.
    pub new_problems: Vec<Problem>,
    /// Problems that are gone.
    pub fixed_problems: Vec<Problem>,
    /// Services re-translated.
    pub translated: usize,
}

/// Objects by reference; a manifests directory may define one object twice, which the
/// translation reports (the API never does).
type Objects<T> = HashMap<ObjectRef, Vec<T>>;

/// A list in progress: what it has listed so far.
#[derive(Debug)]
struct Listing<T> {
    objects: Objects<T>,
    /// Objects without a name, as problems.
    unnamed: Vec<Problem>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self { objects: HashMap::new(), unnamed: Vec::new() }
    }
}

impl<T> Listing<T> {
    /// Adds one listed object as `keep` converts it, if it has a name and no label hides it
    /// from kube-proxies ([`translate::hiding_label`]: left out as if it did not exist).
    fn add<O: Meta>(&mut self, kind: &'static str, object: O, keep: impl FnOnce(O) -> T) {
        if hidden(kind, object.meta()) {
            return;
        }
        match translate::object_ref(object.meta()) {
            Some(r) => {
                // Exactly: a first push would make room for four (over 3 KiB for a Service).
                let definitions = self.objects.entry(r).or_default();
                definitions.reserve_exact(1);
                definitions.push(keep(object));
            }
            None => self.unnamed.push(Problem {
                kind,
                object: format!("{}/(no name)", translate::namespace_of(object.meta())),
                reason: String::from("missing metadata.name"),
                transient: false,
            }),
        }
    }
}

/// Objects with a metadata accessor.
trait Meta {
    fn meta(&self) -> &ObjectMeta;
}

impl Meta for Service {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl Meta for EndpointSlice {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Store {
    /// This node's name and addresses: the translation's input besides the objects.
    context: NodeContext,
    services: Objects<CompactService>,
    slices: Objects<CompactSlice>,
    /// Lists in progress ([`Update::ListStart`] to [`Update::ListDone`]).
    listed_services: Option<Listing<CompactService>>,
    listed_slices: Option<Listing<CompactSlice>>,
    /// The field selector matches one name: at most one.
    listed_node: Option<Vec<Node>>,
    /// Unit → its slices.
    unit_slices: HashMap<ObjectRef, Vec<ObjectRef>>,
    node: Option<Node>,
    units: HashMap<ObjectRef, Unit>,
    /// Frontend → the units that want it, sorted by `namespace/name` (the first one has it).
    claims: BTreeMap<Frontend, Vec<(String, ObjectRef)>>,
    /// Conflict problems of each frontend with more than one claimant.
    conflicts: BTreeMap<Frontend, Vec<Problem>>,
    /// Problems not tied to a unit: objects without a name, unreadable files. By origin.
    loose: BTreeMap<&'static str, Vec<Problem>>,
    desired: Desired,
    dirty: BTreeSet<ObjectRef>,
    /// Pending loose-problem changes, reported by the next flush.
    loose_new: Vec<Problem>,
    loose_fixed: Vec<Problem>,
    problem_count: usize,
    /// Problems ever reported, by object kind.
    rejected_total: BTreeMap<&'static str, u64>,
}

impl Store {
    /// An empty store for node `node_name`, without node addresses (no `NodePort` frontends
    /// until [`Store::set_node_addresses`]).
    #[must_use]
    pub fn new(node_name: &str) -> Self {
        Self {
            context: NodeContext::named(node_name),
            services: HashMap::new(),
            slices: HashMap::new(),
            listed_services: None,
            listed_slices: None,
            listed_node: None,
            unit_slices: HashMap::new(),
            node: None,
            units: HashMap::new(),
            claims: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            loose: BTreeMap::new(),
            desired: Desired::default(),
            dirty: BTreeSet::new(),
            loose_new: Vec::new(),
            loose_fixed: Vec::new(),
            problem_count: 0,
            rejected_total: BTreeMap::new(),
        }
    }

    /// The desired map state as of the last flush.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// This node's Node object, if a source reported it.
    #[must_use]
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// Services and `EndpointSlices` held.
    #[must_use]
    pub fn object_counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// Problems currently standing.
    #[must_use]
    pub fn problem_count(&self) -> usize {
        self.problem_count
    }

    /// Problems reported since start, by object kind (`Service`, `EndpointSlice`, `file`).
    #[must_use]
    pub fn rejected_total(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejected_total
    }

    /// Whether a flush has work to do.
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.loose_new.is_empty() || !self.loose_fixed.is_empty()
    }

    /// Takes one update into account (translation waits for [`Store::flush`]).
    ///
    /// An object listed without a [`Update::ListStart`] starts a list; a [`Update::ListDone`]
    /// without one is ignored.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::ResetServices(all) => {
                let mut listing = Listing::default();
                for svc in all {
                    listing.add("Service", svc, CompactService::new);
                }
                self.reset_services(listing);
            }
            Update::ResetSlices(all) => {
                let mut listing = Listing::default();
                for slice in all {
                    listing.add("EndpointSlice", slice, |s| CompactSlice::new(&s, &self.context.name));
                }
                self.reset_slices(listing);
            }
            Update::ListStart(kind) => match kind {
                "Service" => self.listed_services = Some(Listing::default()),
                "EndpointSlice" => self.listed_slices = Some(Listing::default()),
                "Node" => self.listed_node = Some(Vec::new()),
                _ => {}
            },
            Update::ListedService(svc) => {
                let listing = self.listed_services.get_or_insert_default();
                listing.add("Service", *svc, CompactService::new);
            }
            Update::ListedSlice(slice) => {
                let listing = self.listed_slices.get_or_insert_default();
                listing.add("EndpointSlice", *slice, |s| CompactSlice::new(&s, &self.context.name));
            }
            Update::ListedNode(node) => self.listed_node.get_or_insert_default().push(*node),
            Update::ListDone(kind) => match kind {
                "Service" => {
                    if let Some(listing) = self.listed_services.take() {
                        self.reset_services(listing);
                    }
                }
                "EndpointSlice" => {
                    if let Some(listing) = self.listed_slices.take() {
                        self.reset_slices(listing);
                    }
                }
                "Node" => {
                    if let Some(mut nodes) = self.listed_node.take() {
                        self.set_node(nodes.pop());
                    }
                }
                _ => {}
            },
            Update::ApplyService(svc) => {
                if let Some(r) = named("Service", &svc.metadata) {
                    let kept = (!hidden("Service", &svc.metadata)).then(|| vec![CompactService::new(*svc)]);
                    self.put_service(r, kept);
                }
            }
            Update::DeleteService(svc) => {
                if let Some(r) = named("Service", &svc.metadata) {
                    self.put_service(r, None);
                }
            }
            Update::ApplySlice(slice) => {
                if let Some(r) = named("EndpointSlice", &slice.metadata) {
                    let kept = (!hidden("EndpointSlice", &slice.metadata))
                        .then(|| vec![CompactSlice::new(&slice, &self.context.name)]);
                    self.put_slice(r, kept);
                }
            }
            Update::DeleteSlice(slice) => {
                if let Some(r) = named("EndpointSlice", &slice.metadata) {
                    self.put_slice(r, None);
                }
            }
            Update::Node(node) => self.set_node(node.map(|n| *n)),
            Update::Synced(_) | Update::WatchLost(_) => {}
        }
    }

    /// Takes this node's Node object (or its absence) in. When its zone label changes, every
    /// Service with zone hints in its slices is marked dirty, for the next flush.
    fn set_node(&mut self, node: Option<Node>) {
        let zone = node.as_ref().and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned());
        self.node = node;
        if zone == self.context.zone {
            return;
        }
        info!(node = %self.context.name, zone = zone.as_deref().unwrap_or("(none)"), "node zone for topology hints");
        self.context.zone = zone;
        let hinted = self.slices.iter().filter(|(_, defs)| defs.iter().any(CompactSlice::has_zone_hints));
        let units: Vec<ObjectRef> = hinted.map(|(r, defs)| slice_unit(r, defs)).collect();
        self.dirty.extend(units);
    }

    /// The node addresses `NodePort` frontends are built on (sorted, without duplicates).
    #[must_use]
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.context.addresses
    }

    /// Sets the node addresses `NodePort` frontends answer on. If they differ from the current
    /// ones, every Service with a `nodePort` is marked dirty, for the next flush. Returns whether
    /// they changed.
    pub fn set_node_addresses<A: Into<IpAddr>>(&mut self, addresses: impl IntoIterator<Item = A>) -> bool {
        let addresses: Vec<IpAddr> =
            addresses.into_iter().map(Into::into).collect::<BTreeSet<_>>().into_iter().collect();
        if addresses == self.context.addresses {
            return false;
        }
        self.context.addresses = addresses;
        // Every Service that declares a nodePort, whatever its type: re-translating one that gets
        // no NodePort frontend (a ClusterIP Service, say) costs a translation and changes nothing.
        let with_node_ports = self.services.iter().filter(|(_, defs)| defs.iter().any(CompactService::has_node_port));
        self.dirty.extend(with_node_ports.map(|(r, _)| r.clone()));
        true
    }

    /// Replaces the problems of one origin that belong to no Service (e.g. `"file"` for the
    /// manifests directory's unreadable files).
    pub fn set_loose_problems(&mut self, origin: &'static str, problems: Vec<Problem>) {
        let old = self.loose.remove(origin).unwrap_or_default();
        let (new, fixed) = diff(&old, &problems);
        self.loose_new.extend(new);
        self.loose_fixed.extend(fixed);
        if !problems.is_empty() {
            self.loose.insert(origin, problems);
        }
    }

    /// Re-translates what changed since the last flush.
    pub fn flush(&mut self) -> Changes {
        let mut changes = Changes {
            new_problems: std::mem::take(&mut self.loose_new),
            fixed_problems: std::mem::take(&mut self.loose_fixed),
            ..Changes::default()
        };
        let mut touched = BTreeSet::new();
        let first = self.desired.services.is_empty();
        for unit_ref in std::mem::take(&mut self.dirty) {
            changes.translated += 1;
            let unit = self.translate_unit(&unit_ref);
            let old = self.units.remove(&unit_ref).unwrap_or_default();
            let (new, fixed) = diff(old.problems(), unit.problems());
            changes.new_problems.extend(new);
            changes.fixed_problems.extend(fixed);
            for (fe, _) in &old.frontends {
                if position(&unit.frontends, *fe).is_none() {
                    self.unclaim(*fe, &unit_ref);
                }
                touched.insert(*fe);
            }
            for (fe, _) in &unit.frontends {
                let claimants = self.claims.entry(*fe).or_default();
                let key = unit_ref.to_string();
                if let Err(at) = claimants.binary_search_by(|(k, _)| k.cmp(&key)) {
                    if claimants.is_empty() {
                        // Most frontends have one claimant: not room for four.
                        claimants.reserve_exact(1);
                    }
                    claimants.insert(at, (key, unit_ref.clone()));
                }
                touched.insert(*fe);
            }
            for r in old.health_checks().keys() {
                self.desired.health_checks.remove(r);
            }
            self.desired.health_checks.extend(unit.health_checks().iter().map(|(r, h)| (r.clone(), *h)));
            if !unit.frontends.is_empty() || unit.rest.is_some() {
                self.units.insert(unit_ref, unit);
            }
        }
        for fe in &touched {
            self.resolve(*fe, &mut changes);
        }
        if first {
            model::pack(&mut self.claims);
            model::pack(&mut self.desired.services);
        }
        changes.frontends = touched;
        self.problem_count =
            (self.problem_count + changes.new_problems.len()).saturating_sub(changes.fixed_problems.len());
        for p in &changes.new_problems {
            *self.rejected_total.entry(p.kind).or_default() += 1;
        }
        changes
    }

    fn translate_unit(&self, unit_ref: &ObjectRef) -> Unit {
        let services: Vec<Service> =
            self.services.get(unit_ref).into_iter().flatten().map(CompactService::to_service).collect();
        // Read in their compact forms, packed for this node (`self.context.name`).
        let slices: Vec<SliceView<'_>> = self
            .unit_slices
            .get(unit_ref)
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r, self.slices.get(r)?)))
            .flat_map(|(r, definitions)| definitions.iter().map(move |d| d.input(r)))
            .collect();
        if services.is_empty() && slices.is_empty() {
            return Unit::default();
        }
        let services: Vec<&Service> = services.iter().collect();
        let slices: Vec<&SliceView<'_>> = slices.iter().collect();
        let t = translate::translate_refs(&services, &slices, &self.context);
        let frontends: Vec<(Frontend, Option<ServiceEntry>)> =
            t.desired.services.into_iter().map(|(fe, entry)| (fe, Some(entry))).collect();
        let mut problems = t.problems;
        let mut repeated = Vec::new();
        let unit_name = unit_ref.to_string();
        for (fe, _) in &frontends {
            let reason = translate::conflict_reason(*fe, unit_ref);
            let before = problems.len();
            problems.retain(|p| !(p.kind == "Service" && p.object == unit_name && p.reason == reason));
            if problems.len() != before {
                repeated.push(*fe);
            }
        }
        Unit::new(frontends, t.desired.health_checks, problems, repeated)
    }

    fn unclaim(&mut self, fe: Frontend, unit_ref: &ObjectRef) {
        if let Entry::Occupied(mut claimants) = self.claims.entry(fe) {
            let key = unit_ref.to_string();
            claimants.get_mut().retain(|(k, _)| *k != key);
            if claimants.get().is_empty() {
                claimants.remove();
            }
        }
    }

    /// Sets the desired entry of `fe` from its first claimant, and its conflict problems: one for
    /// each other claimant, and one for the first claimant if it claims `fe` twice itself.
    fn resolve(&mut self, fe: Frontend, changes: &mut Changes) {
        let mut conflicts = Vec::new();
        // The entry held goes back to the claimant it was lent by, if that one still has it
        // lent (a claimant translated again holds a fresh entry, and one that no longer claims
        // `fe` is no claimant).
        let lent = self.desired.services.remove(&fe);
        if let (Some(entry), Some(claimants)) = (lent, self.claims.get(&fe)) {
            let lender = claimants.iter().find(|(_, r)| {
                let unit = self.units.get(r);
                unit.and_then(|u| position(&u.frontends, fe).map(|at| u.frontends[at].1.is_none())) == Some(true)
            });
            if let Some(unit) = lender.and_then(|(_, r)| self.units.get_mut(r))
                && let Some(at) = position(&unit.frontends, fe)
            {
                unit.frontends[at].1 = Some(entry);
            }
        }
        if let Some((winner, claimants)) = self.claims.get(&fe).and_then(|c| c.first().map(|(_, w)| (w, c))) {
            let unit = self.units.get_mut(winner);
            if unit.as_ref().is_some_and(|u| u.repeated().binary_search(&fe).is_ok()) {
                conflicts.push(Problem {
                    kind: "Service",
                    object: winner.to_string(),
                    reason: translate::conflict_reason(fe, winner),
                    transient: false,
                });
            }
            let entry = unit.and_then(|u| {
                let at = position(&u.frontends, fe)?;
                u.frontends[at].1.take()
            });
            if let Some(entry) = entry {
                self.desired.services.insert(fe, entry);
            }
            for (_, loser) in claimants.iter().skip(1) {
                conflicts.push(Problem {
                    kind: "Service",
                    object: loser.to_string(),
                    reason: translate::conflict_reason(fe, winner),
                    transient: false,
                });
            }
        }
        let old = self.conflicts.remove(&fe).unwrap_or_default();
        let (new, fixed) = diff(&old, &conflicts);
        changes.new_problems.extend(new);
        changes.fixed_problems.extend(fixed);
        if !conflicts.is_empty() {
            self.conflicts.insert(fe, conflicts);
        }
    }

    fn put_service(&mut self, r: ObjectRef, svc: Option<Vec<CompactService>>) {
        let changed = match &svc {
            Some(new) => self.services.get(&r) != Some(new),
            None => self.services.contains_key(&r),
        };
        if !changed {
            return;
        }
        match svc {
            Some(new) => self.services.insert(r.clone(), new),
            None => self.services.remove(&r),
        };
        self.dirty.insert(r);
    }

    fn put_slice(&mut self, r: ObjectRef, slice: Option<Vec<CompactSlice>>) {
        let changed = match &slice {
            Some(new) => self.slices.get(&r) != Some(new),
            None => self.slices.contains_key(&r),
        };
        if !changed {
            return;
        }
        if let Some(old_unit) = self.slices.get(&r).map(|old| slice_unit(&r, old)) {
            if let Some(set) = self.unit_slices.get_mut(&old_unit) {
                set.retain(|s| *s != r);
                if set.is_empty() {
                    self.unit_slices.remove(&old_unit);
                }
            }
            self.dirty.insert(old_unit);
        }
        match slice {
            Some(new) => {
                self.join_unit(&r, &new);
                self.slices.insert(r, new);
            }
            None => {
                self.slices.remove(&r);
            }
        }
    }

    /// Counts slice `r` (defined as `definitions`) among its unit's slices, and marks the unit
    /// for translation.
    fn join_unit(&mut self, r: &ObjectRef, definitions: &[CompactSlice]) {
        let unit = slice_unit(r, definitions);
        let set = self.unit_slices.entry(unit.clone()).or_default();
        if !set.contains(r) {
            if set.is_empty() {
                // Most Services have one slice: not room for four.
                set.reserve_exact(1);
            }
            set.push(r.clone());
        }
        self.dirty.insert(unit);
    }

    /// Replaces the Services held with a complete list.
    fn reset_services(&mut self, listing: Listing<CompactService>) {
        self.set_loose_problems("Service", listing.unnamed);
        let by_ref = listing.objects;
        if self.services.is_empty() {
            // The first list (or one after every Service went): each listed one is new, and the
            // listing's map becomes the store's as it is (30,000 entries not hashed again).
            self.dirty.extend(by_ref.keys().cloned());
            self.services = by_ref;
            return;
        }
        let gone: Vec<ObjectRef> = self.services.keys().filter(|r| !by_ref.contains_key(*r)).cloned().collect();
        for r in gone {
            self.put_service(r, None);
        }
        for (r, v) in by_ref {
            self.put_service(r, Some(v));
        }
    }

    /// Replaces the slices held with a complete list.
    fn reset_slices(&mut self, listing: Listing<CompactSlice>) {
        self.set_loose_problems("EndpointSlice", listing.unnamed);
        let by_ref = listing.objects;
        if self.slices.is_empty() {
            // As in `reset_services`: every listed slice is new, and joins its unit.
            for (r, definitions) in &by_ref {
                self.join_unit(r, definitions);
            }
            self.slices = by_ref;
            return;
        }
        let gone: Vec<ObjectRef> = self.slices.keys().filter(|r| !by_ref.contains_key(*r)).cloned().collect();
        for r in gone {
            self.put_slice(r, None);
        }
        for (r, v) in by_ref {
            self.put_slice(r, Some(v));
        }
    }
}

/// The unit a slice belongs to: the Service its label names, or itself without the label (the
/// translation then reports it).
fn slice_unit(slice_ref: &ObjectRef, definitions: &[CompactSlice]) -> ObjectRef {
    let label = definitions.first().and_then(CompactSlice::service_name).filter(|name| !name.is_empty());
    match label {
        Some(name) => ObjectRef { namespace: slice_ref.namespace.clone(), name: name.into() },
        None => slice_ref.clone(),
    }
}

/// Whether a label hides the object from kube-proxies ([`translate::hiding_label`]); such an
/// object counts as absent (an update that adds the label removes it, like the API server's
/// label selector does).
fn hidden(kind: &'static str, meta: &ObjectMeta) -> bool {
    let label = translate::hiding_label(meta);
    if let Some(label) = label {
        let object = translate::object_ref(meta).map_or_else(|| String::from("(no name)"), |r| r.to_string());
        debug!(kind, object, label, "ignored: labelled for another proxy or headless");
    }
    label.is_some()
}

/// The object's reference; an object without a name (which the API never sends) is logged and
/// ignored.
fn named(kind: &'static str, meta: &ObjectMeta) -> Option<ObjectRef> {
    let r = translate::object_ref(meta);
    if r.is_none() {
        tracing::warn!(kind, namespace = translate::namespace_of(meta), "ignoring an object without a name");
    }
    r
}

/// The entry of `fe` in a sorted unit.
fn position(frontends: &[(Frontend, Option<ServiceEntry>)], fe: Frontend) -> Option<usize> {
    frontends.binary_search_by(|(f, _)| f.cmp(&fe)).ok()
}

/// Problems in `new` and not in `old`, and in `old` and not in `new`.
fn diff(old: &[Problem], new: &[Problem]) -> (Vec<Problem>, Vec<Problem>) {
    let key = |p: &Problem| p.to_string();
    let old_keys: BTreeSet<String> = old.iter().map(key).collect();
    let new_keys: BTreeSet<String> = new.iter().map(key).collect();
    (
        new.iter().filter(|p| !old_keys.contains(&key(p))).cloned().collect(),
        old.iter().filter(|p| !new_keys.contains(&key(p))).cloned().collect(),
    )
}

#[cfg(test)]
mod tests;

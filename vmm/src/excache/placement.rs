//! Which memory node holds which guest page, with nodes joining and leaving at run
//! time.
//!
//! Every page that has data on a node records that node's index in a per-page map
//! (`page_node`); a page never written back has none. Where a page goes when it is
//! first written back (or when its node is draining) is decided per stripe of
//! [`STRIPE_PAGES`] pages, so a sequential stream's pages stay on one node and
//! batch: the stripe keeps its node while that node is active and not full;
//! otherwise the active node with the most free capacity (as last reported by its
//! `Stats`) takes it. A node that answers "out of capacity" is marked full and the
//! pages go elsewhere; only when every node is full does the VM stop, saying so.
//!
//! Node indexes are never reused: a detached node keeps its slot, marked gone.
//!
//! A page's entry in the map changes only while the page is owned by whoever
//! moves its remote copy (an evictor holding it `EVICTING`, a drain or the
//! rebalancer holding it `FETCHING`), after the new node acknowledged the write.
//! Every write to a node is chosen through a [`Reservations`], which counts it as
//! in flight on that node until its page is re-pointed; a drain ends only when
//! its node holds none of the VM's pages *and* has no write in flight, so no
//! write chosen before the node started draining can land after it left (see
//! docs/vmm.md, "Moving pages between nodes").

use super::node::unix_secs;
pub use super::node::{Node, NodeEvent, NodeState};
use super::replicas::{MAX_REPLICAS, NodeSpec, Replicas};
use fabric::proto::ErrorCode;
use fabric::{ClientConfig, ClientError, PageClient};
use std::collections::VecDeque;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// Pages per stripe.
pub const STRIPE_PAGES: u64 = 64;
/// Most nodes over a VM's life.
pub const MAX_NODES: usize = 254;
/// Node events kept for the API (the oldest are dropped first).
const MAX_EVENTS: usize = 256;

/// Attach and detach failures; nothing changes when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The node is named wrongly.
    #[error(transparent)]
    Spec(#[from] super::replicas::NodeSpecError),
    /// The node is unreachable or refused us.
    #[error("cannot attach memory node {addr} (unreachable, or it refused us)")]
    Connect {
        /// Its address.
        addr: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Already in the placement.
    #[error("memory node {0} is already attached")]
    Duplicate(String),
    /// Not in the placement.
    #[error("no memory node {0} is attached")]
    Unknown(String),
    /// It failed; nothing is left to detach.
    #[error("memory node {0} has failed and is no longer used; there is nothing to detach")]
    Dead(String),
    /// Detaching it would leave fewer nodes than copies of a page.
    #[error(
        "memory node {addr} cannot be detached: {left} other nodes would remain for {replicas} copies of each page (--replicas); attach another first"
    )]
    TooFew {
        /// Its address.
        addr: String,
        /// Active nodes that would remain.
        left: usize,
        /// Copies per page.
        replicas: usize,
    },
    /// Detaching it would leave none.
    #[error("memory node {0} is the last one; attach another before detaching it")]
    Last(String),
    /// The others cannot hold its pages.
    #[error(
        "cannot detach memory node {addr}: it holds {need} pages of this VM and the remaining nodes have room for {free}"
    )]
    NoRoom {
        /// Its address.
        addr: String,
        /// Pages to move.
        need: u64,
        /// Room elsewhere.
        free: u64,
    },
    /// Already draining.
    #[error("memory node {0} is already being detached")]
    Draining(String),
    /// Too many nodes over the VM's life.
    #[error("at most {MAX_NODES} memory nodes can be attached over a VM's life")]
    TooMany,
}

/// The memory nodes of one VM and where each page's copies live.
pub struct Placement {
    nodes: RwLock<Vec<Arc<Node>>>,
    /// Each page's replica set ([`Replicas`] bits).
    page_set: Box<[AtomicU32]>,
    /// Each stripe's preferred set.
    stripe_set: Box<[AtomicU32]>,
    cursor: AtomicUsize,
    config: ClientConfig,
    /// Copies each page should have (`--replicas`).
    replicas: usize,
    detach_lock: Mutex<()>,
    events: Mutex<VecDeque<NodeEvent>>,
    /// Bumped whenever a page may have been left with fewer live copies than
    /// `replicas` (a node failed, a write-back landed short): the repairer
    /// looks again.
    repair_gen: AtomicU64,
}

fn same_addr(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let resolve = |s: &str| s.to_socket_addrs().ok().map(|i| i.collect::<Vec<_>>());
    match (resolve(a), resolve(b)) {
        (Some(x), Some(y)) => x.iter().any(|s| y.contains(s)),
        _ => false,
    }
}

/// Appends to `chosen`, up to `n` members, the accepting nodes that are not
/// in `exclude`: `prefer` first if it qualifies, then nodes of zones no chosen
/// node is in, then the rest; among equals the one with most free room, ties
/// round-robin from `start`.
fn fill(
    nodes: &[Arc<Node>],
    chosen: &mut Vec<usize>,
    exclude: Replicas,
    n: usize,
    prefer: Option<usize>,
    start: usize,
) {
    let ok = |i: usize, chosen: &[usize]| {
        nodes[i].accepts() && !exclude.contains(i) && !chosen.contains(&i)
    };
    if let Some(i) = prefer
        && i < nodes.len()
        && chosen.len() < n
        && ok(i, chosen)
    {
        chosen.push(i);
    }
    let len = nodes.len();
    while chosen.len() < n {
        let new_zone = |i: usize| match &nodes[i].zone {
            None => false,
            Some(z) => !chosen
                .iter()
                .any(|&c| nodes[c].zone.as_deref() == Some(z.as_str())),
        };
        let Some(best) = (0..len)
            .map(|k| (start + k) % len.max(1))
            .filter(|&i| ok(i, chosen))
            .max_by_key(|&i| (new_zone(i), nodes[i].free_pages()))
        else {
            return;
        };
        chosen.push(best);
    }
}

impl Placement {
    /// Connects to every node (in order), failing on the first unreachable one,
    /// for a guest of `pages` pages whose pages each get `replicas` copies.
    pub fn connect(
        specs: &[String],
        config: &ClientConfig,
        pages: usize,
        replicas: usize,
    ) -> Result<Self, PlacementError> {
        let mut nodes = Vec::new();
        for spec in specs {
            let spec: NodeSpec = spec.parse()?;
            if nodes
                .iter()
                .any(|n: &Arc<Node>| same_addr(&n.addr, &spec.addr))
            {
                return Err(PlacementError::Duplicate(spec.addr));
            }
            nodes.push(Arc::new(Self::open(&spec, config, pages)?));
        }
        if nodes.len() > MAX_NODES {
            return Err(PlacementError::TooMany);
        }
        let now = unix_secs(SystemTime::now());
        let events = nodes
            .iter()
            .map(|n| NodeEvent {
                time: now,
                addr: n.addr.clone(),
                event: "attached",
                detail: format!("instance {:016x}", n.client.node().instance),
            })
            .collect();
        Ok(Placement {
            nodes: RwLock::new(nodes),
            page_set: (0..pages)
                .map(|_| AtomicU32::new(Replicas::EMPTY.bits()))
                .collect(),
            stripe_set: (0..(pages as u64).div_ceil(STRIPE_PAGES))
                .map(|_| AtomicU32::new(Replicas::EMPTY.bits()))
                .collect(),
            cursor: AtomicUsize::new(0),
            config: config.clone(),
            replicas: replicas.clamp(1, MAX_REPLICAS),
            detach_lock: Mutex::new(()),
            events: Mutex::new(events),
            repair_gen: AtomicU64::new(0),
        })
    }

    /// Connects to the node `spec` names, or makes the ideal (in-process) node
    /// it names, sized to hold all `pages` of the guest.
    fn open(spec: &NodeSpec, config: &ClientConfig, pages: usize) -> Result<Node, PlacementError> {
        let addr = spec.addr.as_str();
        let connect = || {
            let client = if fabric::client::is_ideal_addr(addr) {
                PageClient::ideal(addr, pages as u64, config)?
            } else {
                PageClient::connect(addr, config)?
            };
            let node = Node {
                client,
                addr: addr.to_string(),
                zone: spec.zone.clone(),
                state: AtomicU8::new(NodeState::Active as u8),
                full: AtomicBool::new(false),
                full_reason: Mutex::new(None),
                failure: Mutex::new(None),
                pages: AtomicU64::new(0),
                free_estimate: AtomicU64::new(u64::MAX),
                capacity: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
            };
            node.refresh()?;
            Ok(node)
        };
        connect().map_err(|source| PlacementError::Connect {
            addr: addr.to_string(),
            source,
        })
    }

    /// Copies each page should have.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    fn event(&self, addr: &str, event: &'static str, detail: String) {
        let mut ev = self.events.lock().unwrap();
        if ev.len() == MAX_EVENTS {
            ev.pop_front();
        }
        ev.push_back(NodeEvent {
            time: unix_secs(SystemTime::now()),
            addr: addr.to_string(),
            event,
            detail,
        });
    }

    /// What happened to the nodes, oldest first.
    pub fn events(&self) -> Vec<NodeEvent> {
        self.events.lock().unwrap().iter().cloned().collect()
    }

    /// Why the nodes that take no more of this VM's pages refused them, for
    /// the error that stops a VM with nowhere to put its pages.
    pub fn full_reasons(&self) -> String {
        let reasons: Vec<String> = self
            .nodes()
            .iter()
            .filter_map(|n| {
                n.full_reason()
                    .map(|r| format!("{}: {r}", n.addr))
                    .or_else(|| n.failure().map(|(_, r)| format!("{}: failed: {r}", n.addr)))
            })
            .collect();
        if reasons.is_empty() {
            "no node has room".into()
        } else {
            reasons.join("; ")
        }
    }

    /// The failed nodes with their causes, for the error that stops a VM
    /// that lost pages.
    pub fn dead_nodes(&self) -> String {
        let dead: Vec<String> = self
            .nodes()
            .iter()
            .filter_map(|n| n.failure().map(|(_, why)| why))
            .collect();
        dead.join("; ")
    }

    /// All nodes ever attached, by index.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap().clone()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> Arc<Node> {
        self.nodes.read().unwrap()[i].clone()
    }

    /// The nodes holding page `p`'s current version (live or not), primary
    /// first; empty if it was never written out.
    pub fn set_of(&self, p: u64) -> Replicas {
        Replicas::from_bits(self.page_set[p as usize].load(Acquire))
    }

    /// The members of `set` that have not failed.
    pub fn live(&self, set: Replicas) -> Replicas {
        let nodes = self.nodes.read().unwrap();
        set.filter(|i| !nodes[i].is_dead())
    }

    /// True if page `p` has fewer live copies than it should and a copy can
    /// be made: it has none left, or a node outside its set takes pages.
    pub fn needs_copies(&self, p: u64) -> bool {
        let set = self.set_of(p);
        if set.is_empty() {
            return false;
        }
        let nodes = self.nodes.read().unwrap();
        let live = set.filter(|i| !nodes[i].is_dead());
        live.len() < self.replicas
            && (live.is_empty()
                || nodes
                    .iter()
                    .enumerate()
                    .any(|(i, n)| n.accepts() && !set.contains(i)))
    }

    /// Pages with data on some node but fewer live copies than they should
    /// have, pages with none left, and pages with data on some node.
    pub fn below_replicas(&self) -> (u64, u64, u64) {
        let nodes = self.nodes.read().unwrap();
        let dead: Vec<bool> = nodes.iter().map(|n| n.is_dead()).collect();
        let (mut below, mut none, mut placed) = (0, 0, 0);
        for s in self.page_set.iter() {
            let set = Replicas::from_bits(s.load(Relaxed));
            if set.is_empty() {
                continue;
            }
            placed += 1;
            let live = set.filter(|i| !dead[i]).len();
            if live < self.replicas {
                below += 1;
            }
            if live == 0 {
                none += 1;
            }
        }
        (below, none, placed)
    }

    /// Records that page `p`'s current version is held by `set` (every member
    /// acknowledged it); returns the previous set.
    pub fn set_replicas(&self, p: u64, set: Replicas) -> Replicas {
        let old = Replicas::from_bits(self.page_set[p as usize].swap(set.bits(), AcqRel));
        let nodes = self.nodes.read().unwrap();
        for i in set.iter().filter(|&i| !old.contains(i)) {
            nodes[i].pages.fetch_add(1, Relaxed);
        }
        for i in old.iter().filter(|&i| !set.contains(i)) {
            nodes[i].pages.fetch_sub(1, Relaxed);
        }
        old
    }

    /// The repair generation: it changes whenever some page may have been
    /// left short of copies.
    pub fn repair_gen(&self) -> u64 {
        self.repair_gen.load(Acquire)
    }

    /// Notes that some page may be short of copies.
    pub fn want_repair(&self) {
        self.repair_gen.fetch_add(1, AcqRel);
    }

    /// Declares node `i` failed for `why`: never used again by this VM, its
    /// connection closed (so every request waiting on it fails now). True
    /// the first time.
    pub fn mark_dead(&self, i: usize, why: &str) -> bool {
        let node = self.node(i);
        let mut failure = node.failure.lock().unwrap();
        if failure.is_some() || node.state() == NodeState::Detached {
            return false;
        }
        *failure = Some((SystemTime::now(), why.to_string()));
        node.state.store(NodeState::Dead as u8, SeqCst);
        drop(failure);
        node.client.close();
        log::error!(
            "memory node {} failed and is no longer used by this VM: {why}",
            node.addr
        );
        self.event(&node.addr, "failed", why.to_string());
        self.want_repair();
        true
    }

    /// Starts choosing nodes for a set of writes; see [`Reservations`].
    pub fn reservations(&self) -> Reservations<'_> {
        Reservations {
            placement: self,
            held: Vec::new(),
        }
    }

    /// Where page `p` should be written: the members of its set that still
    /// take pages, then its stripe's, then new choices, up to `replicas`
    /// nodes in distinct zones where possible. `None` if every node is full,
    /// failed or leaving. Writes go through [`Reservations::target`], which
    /// calls this.
    fn choose(&self, p: u64) -> Option<Replicas> {
        let nodes = self.nodes.read().unwrap();
        let n = self.replicas;
        let mut chosen: Vec<usize> = Vec::with_capacity(n);
        chosen.extend(
            self.set_of(p)
                .iter()
                .filter(|&i| nodes[i].accepts())
                .take(n),
        );
        let stripe = &self.stripe_set[(p / STRIPE_PAGES) as usize];
        let st = Replicas::from_bits(stripe.load(Acquire));
        for i in st.iter() {
            let zone_taken =
                nodes[i].zone.is_some() && chosen.iter().any(|&c| nodes[c].zone == nodes[i].zone);
            if chosen.len() < n && nodes[i].accepts() && !chosen.contains(&i) && !zone_taken {
                chosen.push(i);
            }
        }
        if chosen.len() < n {
            let start = self.cursor.fetch_add(1, Relaxed);
            let before = chosen.len();
            fill(&nodes, &mut chosen, Replicas::EMPTY, n, None, start);
            for &i in &chosen[before..] {
                nodes[i]
                    .free_estimate
                    .fetch_update(Relaxed, Relaxed, |f| Some(f.saturating_sub(STRIPE_PAGES)))
                    .ok();
            }
            stripe.store(chosen.iter().copied().collect::<Replicas>().bits(), Release);
        }
        if chosen.is_empty() {
            return None;
        }
        Some(chosen.into_iter().collect())
    }

    /// Up to `need` nodes for new copies of a page held by `set`: nodes that
    /// take pages, outside `set`, in zones the live members are not in where
    /// possible, `prefer` first.
    fn extra(&self, set: Replicas, need: usize, prefer: Option<usize>) -> Vec<usize> {
        let nodes = self.nodes.read().unwrap();
        let mut chosen: Vec<usize> = set.filter(|i| !nodes[i].is_dead()).iter().collect();
        let have = chosen.len();
        let start = self.cursor.fetch_add(1, Relaxed);
        fill(&nodes, &mut chosen, set, have + need, prefer, start);
        chosen.split_off(have)
    }

    /// Page indexes with a copy on node `i`.
    pub fn pages_on(&self, i: usize) -> Vec<u64> {
        self.page_set
            .iter()
            .enumerate()
            .filter(|(_, s)| Replicas::from_bits(s.load(Acquire)).contains(i))
            .map(|(p, _)| p as u64)
            .collect()
    }

    /// Attaches the node `spec` names (`ADDR[,zone=NAME]`); returns its index.
    /// A failed or detached node's address can be attached again: it becomes
    /// a new node, trusted with none of the pages it held before.
    pub fn attach(&self, spec: &str) -> Result<usize, PlacementError> {
        let spec: NodeSpec = spec.parse()?;
        let addr = spec.addr.as_str();
        let before = {
            let nodes = self.nodes.read().unwrap();
            if let Some(n) = nodes.iter().find(|n| {
                matches!(n.state(), NodeState::Active | NodeState::Draining)
                    && same_addr(&n.addr, addr)
            }) {
                return Err(PlacementError::Duplicate(n.addr.clone()));
            }
            if nodes.len() >= MAX_NODES {
                return Err(PlacementError::TooMany);
            }
            nodes
                .iter()
                .rev()
                .find(|n| same_addr(&n.addr, addr))
                .map(|n| (n.client.node().instance, n.is_dead()))
        };
        let node = Self::open(&spec, &self.config, self.page_set.len())?;
        let instance = node.client.node().instance;
        let mut nodes = self.nodes.write().unwrap();
        nodes.push(Arc::new(node));
        drop(nodes);
        let detail = match before {
            Some((old, _)) if old != instance => format!(
                "restarted (instance {old:016x}, now {instance:016x}): attached as a new, empty node"
            ),
            Some((_, true)) => format!(
                "the same instance {instance:016x} that failed: attached as a new node; nothing it held before is read"
            ),
            _ => format!("instance {instance:016x}"),
        };
        log::info!("memory node {addr} attached: {detail}");
        self.event(addr, "attached", detail);
        // Pages short of copies can have some here now.
        self.want_repair();
        Ok(self.nodes.read().unwrap().len() - 1)
    }

    /// Starts detaching the node at `addr`: checks that the others can take its
    /// pages and marks it draining. Returns its index.
    pub fn begin_detach(&self, addr: &str) -> Result<usize, PlacementError> {
        // One detach decision at a time (two could each see the other's node as
        // a remaining one).
        let _one = self.detach_lock.lock().unwrap();
        let nodes = self.nodes.read().unwrap();
        let Some(i) = nodes
            .iter()
            .rposition(|n| n.state() != NodeState::Detached && same_addr(&n.addr, addr))
        else {
            return Err(PlacementError::Unknown(addr.to_string()));
        };
        match nodes[i].state() {
            NodeState::Draining => return Err(PlacementError::Draining(nodes[i].addr.clone())),
            NodeState::Dead => return Err(PlacementError::Dead(nodes[i].addr.clone())),
            _ => {}
        }
        let others: Vec<&Arc<Node>> = nodes
            .iter()
            .enumerate()
            .filter(|(k, n)| *k != i && n.state() == NodeState::Active)
            .map(|(_, n)| n)
            .collect();
        if others.is_empty() {
            return Err(PlacementError::Last(nodes[i].addr.clone()));
        }
        if others.len() < self.replicas {
            return Err(PlacementError::TooFew {
                addr: nodes[i].addr.clone(),
                left: others.len(),
                replicas: self.replicas,
            });
        }
        for n in &others {
            if let Err(e) = n.refresh() {
                log::warn!(
                    "memory node {}: {}",
                    n.addr,
                    fabric::client::error_chain(&e)
                );
            }
        }
        let need = nodes[i].pages.load(Relaxed);
        let free: u64 = others
            .iter()
            .filter(|n| !n.is_full())
            .map(|n| n.free_pages())
            .sum();
        if need > free {
            return Err(PlacementError::NoRoom {
                addr: nodes[i].addr.clone(),
                need,
                free,
            });
        }
        if !nodes[i].transition(NodeState::Active, NodeState::Draining) {
            return Err(PlacementError::Dead(nodes[i].addr.clone()));
        }
        self.event(&nodes[i].addr, "draining", String::new());
        Ok(i)
    }

    /// Marks node `i` as gone (it holds none of this VM's pages).
    pub fn finish_detach(&self, i: usize) {
        let node = self.node(i);
        if node.transition(NodeState::Draining, NodeState::Detached) {
            self.event(&node.addr, "detached", String::new());
        }
    }

    /// Puts a draining node back (the drain failed).
    pub fn abort_detach(&self, i: usize) {
        self.node(i)
            .transition(NodeState::Draining, NodeState::Active);
    }
}

/// What [`Reservations::assign`] chose: the nodes, per node index the
/// positions of the pages it takes, and per page the nodes it goes to.
pub struct Assignment {
    /// Every node, by index (taken after the choices, so every chosen index is in it).
    pub nodes: Vec<Arc<Node>>,
    /// Per node index, the positions in the page list of the pages it takes.
    pub per_node: Vec<Vec<usize>>,
    /// Per page, the nodes chosen for it.
    pub sets: Vec<Replicas>,
}

/// The nodes chosen for a set of page writes, each counted as in flight on its
/// node until this is dropped. Drop it only after the written pages have been
/// re-pointed ([`Placement::set_replicas`]) or given up.
///
/// Why: a drain must not end while a write chosen before its node started
/// draining can still land there. [`Reservations::take`] counts the write on the
/// node and only then checks that the node still takes pages; `begin_detach`
/// marks it draining and the drain later reads the count, all `SeqCst`. So
/// either the choice sees the node draining and picks another, or the drain sees
/// the write in flight and waits for it, and then finds its page on the node.
pub struct Reservations<'a> {
    placement: &'a Placement,
    /// (node, writes counted on it), by node index.
    held: Vec<Option<(Arc<Node>, u64)>>,
}

impl Reservations<'_> {
    /// Where page `p` should be written (see [`Placement::choose`]), each
    /// node reserved. `None` if every node is full, failed or leaving.
    pub fn target(&mut self, p: u64) -> Option<Replicas> {
        for _ in 0..=MAX_NODES {
            let set = self.placement.choose(p)?;
            let taken = set.filter(|i| self.take(i));
            if !taken.is_empty() {
                return Some(taken);
            }
        }
        None
    }

    /// Up to `need` reserved nodes for new copies of a page held by `set`
    /// (see [`Placement::extra`]).
    pub fn extra(&mut self, set: Replicas, need: usize, prefer: Option<usize>) -> Vec<usize> {
        // A node that stopped taking pages since it was chosen is left out:
        // the page gets fewer new copies now, and the rest on a later pass.
        let chosen = self.placement.extra(set, need, prefer);
        chosen.into_iter().filter(|&i| self.take(i)).collect()
    }

    /// Chooses and reserves the nodes for each of `pages` (see
    /// [`Reservations::target`]). `None` if some page has nowhere to go.
    pub fn assign(&mut self, pages: &[usize]) -> Option<Assignment> {
        let mut sets = Vec::with_capacity(pages.len());
        for &p in pages {
            sets.push(self.target(p as u64)?);
        }
        let nodes = self.placement.nodes();
        let mut per_node = vec![Vec::new(); nodes.len()];
        for (k, set) in sets.iter().enumerate() {
            for i in set.iter() {
                per_node[i].push(k);
            }
        }
        Some(Assignment {
            nodes,
            per_node,
            sets,
        })
    }

    /// Reserves a write to node `i` if it still takes pages.
    pub fn take(&mut self, i: usize) -> bool {
        if self.held.len() <= i {
            self.held.resize(i + 1, None);
        }
        // The node's handle is looked up once per node, not once per page.
        let (node, n) = self.held[i].get_or_insert_with(|| (self.placement.node(i), 0));
        node.in_flight.fetch_add(1, SeqCst);
        if !node.accepts() {
            node.in_flight.fetch_sub(1, SeqCst);
            return false;
        }
        *n += 1;
        true
    }
}

impl Drop for Reservations<'_> {
    fn drop(&mut self) {
        for (node, n) in self.held.iter().flatten() {
            node.in_flight.fetch_sub(*n, SeqCst);
        }
    }
}

/// True if `e` is a node's "out of capacity" answer.
pub fn is_out_of_capacity(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Remote {
            code: ErrorCode::OutOfCapacity,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A placement over in-process (ideal) nodes, each `NAME,zone=Z`.
    fn over(specs: &[&str], replicas: usize) -> Placement {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Placement::connect(&specs, &ClientConfig::default(), 4096, replicas).unwrap()
    }

    fn zones(p: &Placement, set: Replicas) -> Vec<Option<String>> {
        set.iter().map(|i| p.node(i).zone.clone()).collect()
    }

    #[test]
    fn copies_go_to_distinct_zones_while_zones_have_room() {
        let p = over(
            &[
                "ideal:a,zone=x",
                "ideal:b,zone=x",
                "ideal:c,zone=y",
                "ideal:d,zone=y",
            ],
            2,
        );
        for page in (0..4096).step_by(STRIPE_PAGES as usize) {
            let set = p.reservations().target(page).unwrap();
            let z = zones(&p, set);
            assert_eq!(z.len(), 2, "{set:?}");
            assert_ne!(z[0], z[1], "page {page}: both copies in one zone ({set:?})");
        }
        // With one zone full, both copies go to the other (rather than one).
        p.node(2)
            .mark_full(&ClientError::InvalidRequest("test".into()));
        p.node(3)
            .mark_full(&ClientError::InvalidRequest("test".into()));
        let set = p.reservations().target(9).unwrap();
        assert_eq!(zones(&p, set), [Some("x".into()), Some("x".into())]);
    }

    #[test]
    fn a_dead_member_leaves_its_pages_short_until_copied() {
        let p = over(&["ideal:a", "ideal:b", "ideal:c"], 2);
        let set = p.reservations().target(5).unwrap();
        assert_eq!(set.len(), 2);
        p.set_replicas(5, set);
        assert_eq!(p.below_replicas(), (0, 0, 1));
        assert!(!p.needs_copies(5));
        let dead = set.primary().unwrap();
        assert!(p.mark_dead(dead, "test"));
        assert!(!p.mark_dead(dead, "test again"), "declared dead once");
        assert_eq!(p.below_replicas(), (1, 0, 1));
        assert!(p.needs_copies(5), "the third node can take a copy");
        assert_eq!(p.live(set), set.without(dead));
        // New copies never go to the dead node or to the live member.
        let extra = p.reservations().extra(set, 1, None);
        assert_eq!(extra.len(), 1);
        assert!(!set.contains(extra[0]));
        // Nor does a write-back, and the dead node cannot be detached.
        let target = p.reservations().target(5).unwrap();
        assert!(!target.contains(dead));
        assert!(matches!(
            p.begin_detach(&p.node(dead).addr),
            Err(PlacementError::Dead(_))
        ));
        // Two live nodes for two copies: neither may leave.
        let live = set.without(dead).primary().unwrap();
        assert!(matches!(
            p.begin_detach(&p.node(live).addr),
            Err(PlacementError::TooFew {
                left: 1,
                replicas: 2,
                ..
            })
        ));
        assert_eq!(p.events().iter().filter(|e| e.event == "failed").count(), 1);
    }

    #[test]
    fn addresses_compare_after_resolution() {
        assert!(same_addr("127.0.0.1:7000", "127.0.0.1:7000"));
        assert!(same_addr("localhost:7000", "127.0.0.1:7000"));
        assert!(!same_addr("127.0.0.1:7000", "127.0.0.1:7001"));
    }
}

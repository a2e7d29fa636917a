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

use fabric::proto::ErrorCode;
use fabric::{ClientConfig, ClientError, PageClient};
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, RwLock};

/// Pages per stripe.
pub const STRIPE_PAGES: u64 = 64;
/// `page_node` value of a page with no data on any node.
pub const UNPLACED: u8 = u8::MAX;
/// Most nodes over a VM's life.
pub const MAX_NODES: usize = 254;

/// A node's part in the placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new pages.
    Active,
    /// Being emptied before it leaves; takes no new pages.
    Draining,
    /// Detached: holds none of this VM's pages.
    Detached,
}

/// One memory node.
pub struct Node {
    /// Its connection.
    pub client: PageClient,
    /// The address it was given as.
    pub addr: String,
    state: AtomicU8,
    full: AtomicBool,
    /// Why it last counted as full (the node's own words).
    full_reason: std::sync::Mutex<Option<String>>,
    /// This VM's pages on it.
    pub pages: AtomicU64,
    free_estimate: AtomicU64,
    capacity: AtomicU64,
    /// Writes chosen for this node whose pages are not yet re-pointed to it
    /// (see [`Reservations`]).
    in_flight: AtomicU64,
}

impl Node {
    /// Its state.
    pub fn state(&self) -> NodeState {
        // SeqCst: ordered against the in-flight count (see `Reservations::take`).
        match self.state.load(SeqCst) {
            0 => NodeState::Active,
            1 => NodeState::Draining,
            _ => NodeState::Detached,
        }
    }

    fn set_state(&self, s: NodeState) {
        // SeqCst: ordered against the in-flight count (see `Reservations::take`).
        self.state.store(s as u8, SeqCst);
    }

    /// Writes chosen for this node and not yet recorded in the page map.
    pub fn writes_in_flight(&self) -> u64 {
        self.in_flight.load(SeqCst)
    }

    /// True if it answered "out of capacity" (until its stats say otherwise).
    pub fn is_full(&self) -> bool {
        self.full.load(Acquire)
    }

    /// Marks it full for this VM, for the reason the node gave (out of
    /// capacity, or the VM at its quota there).
    pub fn mark_full(&self, why: &ClientError) {
        let why = fabric::client::error_chain(why);
        if !self.full.swap(true, AcqRel) {
            log::warn!(
                "memory node {} takes no more of this VM's pages ({why}); placing pages on other nodes",
                self.addr
            );
        }
        *self.full_reason.lock().unwrap() = Some(why);
    }

    /// Why it counts as full, if it does.
    pub fn full_reason(&self) -> Option<String> {
        if !self.is_full() {
            return None;
        }
        self.full_reason.lock().unwrap().clone()
    }

    /// Free pages on the node as last reported.
    pub fn free_pages(&self) -> u64 {
        self.free_estimate.load(Relaxed)
    }

    /// The node's capacity in pages as last reported.
    pub fn capacity_pages(&self) -> u64 {
        self.capacity.load(Relaxed)
    }

    /// Asks the node for its capacity and use.
    pub fn refresh(&self) -> Result<(), ClientError> {
        let s = self.client.stats()?;
        let free = s.vm_room();
        self.free_estimate.store(free, Relaxed);
        self.capacity.store(s.node_capacity_pages, Relaxed);
        if free > 0 {
            self.full.store(false, Release);
        }
        Ok(())
    }

    fn accepts(&self) -> bool {
        self.state() == NodeState::Active && !self.is_full()
    }
}

/// Attach and detach failures; nothing changes when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The node is unreachable or refused us.
    #[error("cannot attach memory node {addr}")]
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

/// The memory nodes of one VM and where each page lives.
pub struct Placement {
    nodes: RwLock<Vec<Arc<Node>>>,
    page_node: Box<[AtomicU8]>,
    stripe_node: Box<[AtomicU8]>,
    cursor: AtomicUsize,
    config: ClientConfig,
    detach_lock: std::sync::Mutex<()>,
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

impl Placement {
    /// Connects to every node (in order), failing on the first unreachable one,
    /// for a guest of `pages` pages.
    pub fn connect(
        addrs: &[String],
        config: &ClientConfig,
        pages: usize,
    ) -> Result<Self, ClientError> {
        let mut nodes = Vec::new();
        for a in addrs {
            if nodes.iter().any(|n: &Arc<Node>| same_addr(&n.addr, a)) {
                return Err(ClientError::InvalidRequest(format!(
                    "memory node {a} is given twice"
                )));
            }
            nodes.push(Arc::new(Self::open(a, config, pages)?));
        }
        Ok(Placement {
            nodes: RwLock::new(nodes),
            page_node: (0..pages).map(|_| AtomicU8::new(UNPLACED)).collect(),
            stripe_node: (0..(pages as u64).div_ceil(STRIPE_PAGES))
                .map(|_| AtomicU8::new(UNPLACED))
                .collect(),
            cursor: AtomicUsize::new(0),
            config: config.clone(),
            detach_lock: std::sync::Mutex::new(()),
        })
    }

    /// Connects to the node at `addr`, or makes the ideal (in-process) node it
    /// names, sized to hold all `pages` of the guest.
    fn open(addr: &str, config: &ClientConfig, pages: usize) -> Result<Node, ClientError> {
        let client = if fabric::client::is_ideal_addr(addr) {
            PageClient::ideal(addr, pages as u64, config)?
        } else {
            PageClient::connect(addr, config)?
        };
        let node = Node {
            client,
            addr: addr.to_string(),
            state: AtomicU8::new(NodeState::Active as u8),
            full: AtomicBool::new(false),
            full_reason: std::sync::Mutex::new(None),
            pages: AtomicU64::new(0),
            free_estimate: AtomicU64::new(u64::MAX),
            capacity: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        };
        node.refresh()?;
        Ok(node)
    }

    /// Why the nodes that take no more of this VM's pages refused them, for
    /// the error that stops a VM with nowhere to put its pages.
    pub fn full_reasons(&self) -> String {
        let reasons: Vec<String> = self
            .nodes()
            .iter()
            .filter_map(|n| n.full_reason().map(|r| format!("{}: {r}", n.addr)))
            .collect();
        if reasons.is_empty() {
            "no node has room".into()
        } else {
            reasons.join("; ")
        }
    }

    /// All nodes ever attached, by index.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap().clone()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> Arc<Node> {
        self.nodes.read().unwrap()[i].clone()
    }

    /// The node holding page `p`'s data, if it has any.
    pub fn node_of(&self, p: u64) -> Option<usize> {
        match self.page_node[p as usize].load(Acquire) {
            UNPLACED => None,
            i => Some(i as usize),
        }
    }

    /// Records that page `p`'s data now lives on node `i` (after the node
    /// acknowledged it); returns the previous node.
    pub fn set_node(&self, p: u64, i: usize) -> Option<usize> {
        let old = self.page_node[p as usize].swap(i as u8, AcqRel);
        let nodes = self.nodes.read().unwrap();
        nodes[i].pages.fetch_add(1, Relaxed);
        if old != UNPLACED {
            nodes[old as usize].pages.fetch_sub(1, Relaxed);
            return Some(old as usize);
        }
        None
    }

    /// Starts choosing nodes for a set of writes; see [`Reservations`].
    pub fn reservations(&self) -> Reservations<'_> {
        Reservations {
            placement: self,
            held: Vec::new(),
        }
    }

    /// Where page `p` should be written: its node if that still takes pages,
    /// else its stripe's, else a new choice. `None` if every node is full or
    /// leaving. Writes go through [`Reservations::target`], which calls this.
    fn choose(&self, p: u64) -> Option<usize> {
        let nodes = self.nodes.read().unwrap();
        let cur = self.page_node[p as usize].load(Acquire);
        if cur != UNPLACED && nodes[cur as usize].accepts() {
            return Some(cur as usize);
        }
        let stripe = &self.stripe_node[(p / STRIPE_PAGES) as usize];
        let s = stripe.load(Acquire);
        if s != UNPLACED && nodes[s as usize].accepts() {
            return Some(s as usize);
        }
        // The accepting node with the most free room; ties go round-robin.
        let start = self.cursor.fetch_add(1, Relaxed);
        let n = nodes.len();
        let best = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| nodes[i].accepts())
            .max_by_key(|&i| nodes[i].free_pages())?;
        nodes[best]
            .free_estimate
            .fetch_update(Relaxed, Relaxed, |f| Some(f.saturating_sub(STRIPE_PAGES)))
            .ok();
        stripe.store(best as u8, Release);
        Some(best)
    }

    /// Pages of page indexes placed on node `i`.
    pub fn pages_on(&self, i: usize) -> Vec<u64> {
        self.page_node
            .iter()
            .enumerate()
            .filter(|(_, n)| n.load(Acquire) as usize == i)
            .map(|(p, _)| p as u64)
            .collect()
    }

    /// Attaches the node at `addr`; returns its index.
    pub fn attach(&self, addr: &str) -> Result<usize, PlacementError> {
        {
            let nodes = self.nodes.read().unwrap();
            if let Some(n) = nodes
                .iter()
                .find(|n| n.state() != NodeState::Detached && same_addr(&n.addr, addr))
            {
                return Err(PlacementError::Duplicate(n.addr.clone()));
            }
            if nodes.len() >= MAX_NODES {
                return Err(PlacementError::TooMany);
            }
        }
        let node = Self::open(addr, &self.config, self.page_node.len()).map_err(|source| {
            PlacementError::Connect {
                addr: addr.to_string(),
                source,
            }
        })?;
        let mut nodes = self.nodes.write().unwrap();
        nodes.push(Arc::new(node));
        log::info!("memory node {addr} attached");
        Ok(nodes.len() - 1)
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
            .position(|n| n.state() != NodeState::Detached && same_addr(&n.addr, addr))
        else {
            return Err(PlacementError::Unknown(addr.to_string()));
        };
        if nodes[i].state() == NodeState::Draining {
            return Err(PlacementError::Draining(nodes[i].addr.clone()));
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
        nodes[i].set_state(NodeState::Draining);
        Ok(i)
    }

    /// Marks node `i` as gone (it holds none of this VM's pages).
    pub fn finish_detach(&self, i: usize) {
        self.node(i).set_state(NodeState::Detached);
    }

    /// Puts a draining node back (the drain failed).
    pub fn abort_detach(&self, i: usize) {
        self.node(i).set_state(NodeState::Active);
    }
}

/// What [`Reservations::assign`] chose: the nodes, and per node index the
/// positions of the pages it takes.
pub type Assignment = (Vec<Arc<Node>>, Vec<Vec<usize>>);

/// The nodes chosen for a set of page writes, each counted as in flight on its
/// node until this is dropped. Drop it only after the written pages have been
/// re-pointed ([`Placement::set_node`]) or given up.
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
    /// Where page `p` should be written (see [`Placement::choose`]), reserved.
    /// `None` if every node is full or leaving.
    pub fn target(&mut self, p: u64) -> Option<usize> {
        for _ in 0..=MAX_NODES {
            let i = self.placement.choose(p)?;
            if self.take(i) {
                return Some(i);
            }
        }
        None
    }

    /// Chooses and reserves a node for each of `pages`: `prefer` if it still
    /// takes pages, else where [`Reservations::target`] sends the page. Returns
    /// the nodes (taken after the choices, so every chosen index is in it) and,
    /// per node index, the positions in `pages` of the pages it takes. `None` if
    /// some page has nowhere to go.
    pub fn assign(&mut self, pages: &[usize], prefer: Option<usize>) -> Option<Assignment> {
        let mut chosen = Vec::with_capacity(pages.len());
        for &p in pages {
            let i = match prefer {
                Some(i) if self.take(i) => i,
                _ => self.target(p as u64)?,
            };
            chosen.push(i);
        }
        let nodes = self.placement.nodes();
        let mut per_node = vec![Vec::new(); nodes.len()];
        for (k, i) in chosen.into_iter().enumerate() {
            per_node[i].push(k);
        }
        Some((nodes, per_node))
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
    use super::same_addr;

    #[test]
    fn addresses_compare_after_resolution() {
        assert!(same_addr("127.0.0.1:7000", "127.0.0.1:7000"));
        assert!(same_addr("localhost:7000", "127.0.0.1:7000"));
        assert!(!same_addr("127.0.0.1:7000", "127.0.0.1:7001"));
    }
}

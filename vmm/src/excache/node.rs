//! One memory node as a VM's placement sees it: its connection, its state
//! (active, draining, detached, dead), its room, and the events of its life.

use fabric::{ClientError, PageClient};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::*};
use std::time::SystemTime;

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
    /// Failed (no answer, a lost connection, an error reply or a bad page):
    /// never used again by this VM. Its address may be attached again, as a
    /// new node.
    Dead,
}

/// One memory node.
pub struct Node {
    /// Its connection.
    pub client: PageClient,
    /// The address it was given as.
    pub addr: String,
    /// Its failure domain (`--memnode ADDR,zone=NAME`).
    pub zone: Option<String>,
    pub(super) state: AtomicU8,
    pub(super) full: AtomicBool,
    /// Why it last counted as full (the node's own words).
    pub(super) full_reason: Mutex<Option<String>>,
    /// Why it was declared dead, and when.
    pub(super) failure: Mutex<Option<(SystemTime, String)>>,
    /// This VM's pages on it.
    pub pages: AtomicU64,
    pub(super) free_estimate: AtomicU64,
    pub(super) capacity: AtomicU64,
    /// Writes chosen for this node whose pages are not yet re-pointed to it
    /// (see [`Reservations`]).
    pub(super) in_flight: AtomicU64,
}

impl Node {
    /// Its state.
    pub fn state(&self) -> NodeState {
        // SeqCst: ordered against the in-flight count (see `Reservations::take`).
        match self.state.load(SeqCst) {
            0 => NodeState::Active,
            1 => NodeState::Draining,
            2 => NodeState::Detached,
            _ => NodeState::Dead,
        }
    }

    /// Moves it from state `from` to `to`; false if it was not in `from`.
    pub(super) fn transition(&self, from: NodeState, to: NodeState) -> bool {
        // SeqCst: ordered against the in-flight count (see `Reservations::take`).
        self.state
            .compare_exchange(from as u8, to as u8, SeqCst, SeqCst)
            .is_ok()
    }

    /// True if it failed.
    pub fn is_dead(&self) -> bool {
        self.state() == NodeState::Dead
    }

    /// Why it failed, and when.
    pub fn failure(&self) -> Option<(SystemTime, String)> {
        self.failure.lock().unwrap().clone()
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

    pub(super) fn accepts(&self) -> bool {
        self.state() == NodeState::Active && !self.is_full()
    }
}

/// Something that happened to a node, for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeEvent {
    /// When (seconds since the Unix epoch).
    pub time: f64,
    /// The node.
    pub addr: String,
    /// What happened: `attached`, `failed`, `draining`, `detached`, `restarted`.
    pub event: &'static str,
    /// Details (a failure's cause).
    pub detail: String,
}

pub(super) fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

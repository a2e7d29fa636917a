//! The table of requests in flight. A request's NBD handle is its slot index plus
//! the slot's generation (`generation << 32 | index`), so a stale or forged handle
//! in a reply is detected rather than completing the wrong request.

use super::{ClientError, Completion, Handle};
use crate::wire::Cmd;

/// What runs when a request completes.
pub(super) type Callback = Box<dyn FnOnce(Completion) + Send>;

pub(super) enum State {
    Free,
    /// A write whose payload the submitter is still sending (it holds the buffer).
    Sending {
        cb: Callback,
    },
    /// Sent; waiting for the reply. `buf` is the read buffer or the written data.
    Waiting {
        cb: Callback,
        cmd: Cmd,
        buf: Vec<u8>,
    },
    /// The reply (or a failure) arrived while the payload was still being sent; the
    /// submitter completes it when it is done sending.
    Replied {
        cb: Callback,
        result: Result<(), ClientError>,
    },
}

struct Entry {
    generation: u32,
    state: State,
}

/// The slots, guarded by the client's mutex.
pub(super) struct Slots {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Slots not `Free`.
    pub in_flight: usize,
    /// Threads waiting for `in_flight` to drop.
    pub waiters: usize,
    /// Set once the connection is unusable; every later submit fails with it.
    pub dead: Option<ClientError>,
    /// Set when the last handle is dropped.
    pub closing: bool,
}

/// A completion to deliver once the lock is released.
pub(super) type Ready = (Callback, Completion);

impl Slots {
    pub fn new() -> Self {
        Slots {
            entries: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            waiters: 0,
            dead: None,
            closing: false,
        }
    }

    /// Takes a free slot for a request in `state`; returns its handle.
    pub fn insert(&mut self, state: State) -> Handle {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    state: State::Free,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        e.generation = e.generation.wrapping_add(1);
        e.state = state;
        self.in_flight += 1;
        Handle((e.generation as u64) << 32 | index as u64)
    }

    fn entry(&mut self, h: Handle) -> Option<&mut Entry> {
        let index = (h.0 & 0xffff_ffff) as usize;
        let generation = (h.0 >> 32) as u32;
        self.entries
            .get_mut(index)
            .filter(|e| e.generation == generation && !matches!(e.state, State::Free))
    }

    /// The command of a request waiting for its reply; `None` for an unknown handle
    /// (a server bug), `Some(None)` for a write still being sent.
    pub fn waiting_cmd(&mut self, h: Handle) -> Option<Option<Cmd>> {
        self.entry(h).map(|e| match &e.state {
            State::Waiting { cmd, .. } => Some(*cmd),
            _ => None,
        })
    }

    /// Takes the buffer of a waiting read (to fill it outside the lock).
    pub fn take_buf(&mut self, h: Handle) -> Vec<u8> {
        match self.entry(h).map(|e| &mut e.state) {
            Some(State::Waiting { buf, .. }) => std::mem::take(buf),
            _ => Vec::new(),
        }
    }

    /// Gives a waiting request its buffer back (after a failed payload read).
    pub fn put_buf(&mut self, h: Handle, b: Vec<u8>) {
        if let Some(State::Waiting { buf, .. }) = self.entry(h).map(|e| &mut e.state) {
            *buf = b;
        }
    }

    /// Returns slot `h` (already set `Free`) to the free list.
    fn free_slot(&mut self, h: Handle) {
        self.free.push((h.0 & 0xffff_ffff) as u32);
        self.in_flight -= 1;
    }

    /// Records the outcome of request `h`. Returns the completion to deliver, or
    /// `None` if the submitter is still sending it (it will deliver it).
    pub fn complete(
        &mut self,
        h: Handle,
        result: Result<(), ClientError>,
        data: Option<Vec<u8>>,
    ) -> Option<Ready> {
        let e = self.entry(h)?;
        match std::mem::replace(&mut e.state, State::Free) {
            State::Sending { cb } => {
                e.state = State::Replied { cb, result };
                None
            }
            State::Waiting { cb, buf, .. } => {
                self.free_slot(h);
                Some((
                    cb,
                    Completion {
                        handle: h,
                        result,
                        buf: data.unwrap_or(buf),
                    },
                ))
            }
            other => {
                e.state = other;
                None
            }
        }
    }

    /// The submitter finished sending write `h` (whose payload is `data`): the
    /// request now waits for its reply, or completes if the reply came already.
    pub fn sent(&mut self, h: Handle, data: Vec<u8>) -> Option<Ready> {
        let e = self.entry(h).expect("a write being sent keeps its slot");
        match std::mem::replace(&mut e.state, State::Free) {
            State::Sending { cb } => {
                e.state = State::Waiting {
                    cb,
                    cmd: Cmd::WRITE,
                    buf: data,
                };
                None
            }
            State::Replied { cb, result } => {
                self.free_slot(h);
                Some((
                    cb,
                    Completion {
                        handle: h,
                        result,
                        buf: data,
                    },
                ))
            }
            other => {
                e.state = other;
                None
            }
        }
    }

    /// Marks the connection dead with `err` and fails every request: waiting ones
    /// are returned for delivery, ones still being sent are left to their submitter.
    pub fn fail_all(&mut self, err: &ClientError) -> Vec<Ready> {
        if self.dead.is_none() {
            self.dead = Some(err.clone());
        }
        let err = self.dead.clone().expect("just set");
        let mut ready = Vec::new();
        for i in 0..self.entries.len() {
            let h = Handle((self.entries[i].generation as u64) << 32 | i as u64);
            match &self.entries[i].state {
                State::Waiting { .. } | State::Sending { .. } => {
                    if let Some(r) = self.complete(h, Err(err.clone()), None) {
                        ready.push(r);
                    }
                }
                State::Free | State::Replied { .. } => {}
            }
        }
        ready
    }
}

//! Read-ahead marks: asynchronous read-ahead for sequential streams.
//!
//! A window of a sequential stream is fetched one window ahead of the guest. Its
//! first page, the *mark*, is fetched with the window but not installed: it is
//! kept here, with its frame reserved and its state `FETCHING`. When the guest
//! reaches the mark it faults; the fault is served from here at local cost and
//! starts the fetch of the next window, while the guest works through the
//! window just entered. The guest then waits on the network only when the
//! fabric is slower than its own progress (this is Linux's `PG_readahead`
//! scheme; the mark plays the part of the flagged page).
//!
//! A mark the guest never reaches (the stream ended or jumped) still holds a
//! frame, so at most [`MARKS`] are kept; the oldest is dropped to make room.
//! Dropping loses nothing: a mark is a copy of the page's remote content (or a
//! page never written), and the remote copy stays where it is. A drain drops all
//! marks first, so that the pages they stand for can move.

use super::{ABSENT, Shared};
use std::sync::Mutex;
use std::sync::atomic::Ordering::*;

/// Most marks kept at once (one per recent stream).
pub(crate) const MARKS: usize = 8;

/// A page fetched ahead and left for the guest's fault to install.
pub(crate) struct Mark {
    /// The guest page.
    pub(crate) page: usize,
    /// Its content; `None` for a page never written (installed as zeros).
    pub(crate) data: Option<Box<[u8]>>,
    /// The last page the stream has been fetched up to.
    pub(crate) stream_end: usize,
}

/// The marks of recent streams.
pub(crate) struct Marks(Mutex<Vec<Mark>>);

impl Marks {
    pub(crate) fn new() -> Self {
        Marks(Mutex::new(Vec::with_capacity(MARKS)))
    }

    /// Keeps `mark` (its page claimed, its frame reserved), dropping the oldest
    /// mark if [`MARKS`] are kept. Then wakes any vCPU that faulted on the page
    /// while it was being fetched: it faults again and finds the mark.
    pub(crate) fn stage(&self, s: &Shared, mark: Mark) {
        let page = mark.page;
        let dropped = {
            let mut g = self.0.lock().unwrap();
            let old = (g.len() >= MARKS).then(|| g.remove(0));
            g.push(mark);
            old
        };
        if let Some(old) = dropped {
            release(s, old.page);
        }
        let _ = s.uffd.wake(s.addr(page) as *mut _, super::uffd::PAGE);
    }

    /// Marks kept: the streams with read-ahead under way.
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Takes the mark on `page`, if there is one.
    pub(crate) fn take(&self, page: usize) -> Option<Mark> {
        let mut g = self.0.lock().unwrap();
        let i = g.iter().position(|m| m.page == page)?;
        Some(g.remove(i))
    }

    /// Drops every mark: their pages become absent again.
    pub(crate) fn drop_all(&self, s: &Shared) {
        let all = std::mem::take(&mut *self.0.lock().unwrap());
        for m in all {
            release(s, m.page);
        }
    }
}

/// Returns a dropped mark's page to `ABSENT` and its frame to the pool, then
/// wakes any vCPU that faulted on it meanwhile (it faults again and is served
/// as usual).
fn release(s: &Shared, page: usize) {
    s.state[page].store(ABSENT, Release);
    s.release_frames(1);
    s.stats.readahead_dropped.fetch_add(1, Relaxed);
    let _ = s.uffd.wake(s.addr(page) as *mut _, super::uffd::PAGE);
}

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
//! frame, so at most [`MARKS`] are kept, the oldest dropped to make room, and a
//! mark unreached after [`MARK_TTL`] is dropped when a stream next stages or
//! starts. Dropping loses nothing: a mark is a copy of the page's remote content
//! (or a page never written), and the remote copy stays where it is. A drain
//! drops the marks of the departing node's pages first, so that they can move.

use super::{ABSENT, Shared};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

/// Most marks kept at once (one per recent stream).
pub(crate) const MARKS: usize = 8;

/// A mark the guest has not reached in this long belongs to a stream that ended.
/// (A guest crosses a window in well under a millisecond here; the nested test
/// host is a hundred times slower.)
pub(crate) const MARK_TTL: Duration = Duration::from_secs(1);

/// A page fetched ahead and left for the guest's fault to install.
pub(crate) struct Mark {
    /// The guest page.
    pub(crate) page: usize,
    /// Its content; `None` for a page never written (installed as zeros).
    pub(crate) data: Option<Box<[u8]>>,
    /// The last page the stream has been fetched up to.
    pub(crate) stream_end: usize,
    /// The stream's stride, in pages.
    pub(crate) stride: i64,
    /// The window that was fetched with this mark; the next one is twice as
    /// large (the guest reached this one), up to the cache's limit.
    pub(crate) window: usize,
    /// Where the guest's stream was when this mark was fetched: the pages
    /// between there and the mark were passed on the way to it.
    pub(crate) from: usize,
}

/// The marks of recent streams.
pub(crate) struct Marks {
    kept: Mutex<Vec<(Mark, Instant)>>,
    /// `kept.len()`, readable without the lock (the frame reservation path
    /// sizes read-ahead by it).
    count: AtomicUsize,
}

impl Marks {
    pub(crate) fn new() -> Self {
        Marks {
            kept: Mutex::new(Vec::with_capacity(MARKS)),
            count: AtomicUsize::new(0),
        }
    }

    /// Keeps `mark` (its page claimed, its frame reserved), dropping expired
    /// marks and, if [`MARKS`] are still kept, the oldest. Then wakes any vCPU
    /// that faulted on the page while it was being fetched: it faults again and
    /// finds the mark.
    pub(crate) fn stage(&self, s: &Shared, mark: Mark) {
        let page = mark.page;
        let dropped = {
            let mut g = self.kept.lock().unwrap();
            let mut dropped = take_expired(&mut g);
            if g.len() >= MARKS {
                dropped.push(g.remove(0).0);
            }
            g.push((mark, Instant::now()));
            self.count.store(g.len(), Relaxed);
            dropped
        };
        for m in dropped {
            release(s, &m);
        }
        let _ = s.uffd.wake(s.addr(page) as *mut _, super::uffd::PAGE);
    }

    /// Marks kept: the streams with read-ahead under way.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Relaxed)
    }

    /// Takes the mark on `page`, if there is one.
    pub(crate) fn take(&self, page: usize) -> Option<Mark> {
        let mut g = self.kept.lock().unwrap();
        let i = g.iter().position(|(m, _)| m.page == page)?;
        let m = g.remove(i).0;
        self.count.store(g.len(), Relaxed);
        Some(m)
    }

    /// Drops the marks unreached for [`MARK_TTL`] (a new stream is starting).
    pub(crate) fn expire(&self, s: &Shared) {
        if self.len() == 0 {
            return;
        }
        let dropped = {
            let mut g = self.kept.lock().unwrap();
            let d = take_expired(&mut g);
            self.count.store(g.len(), Relaxed);
            d
        };
        for m in dropped {
            release(s, &m);
        }
    }

    /// Drops the marks whose page `pred` selects: their pages become absent again.
    pub(crate) fn drop_where(&self, s: &Shared, pred: impl Fn(usize) -> bool) {
        let dropped: Vec<Mark> = {
            let mut g = self.kept.lock().unwrap();
            let out = take_matching(&mut g, |m, _| pred(m.page));
            self.count.store(g.len(), Relaxed);
            out
        };
        for m in dropped {
            release(s, &m);
        }
    }
}

fn take_expired(kept: &mut Vec<(Mark, Instant)>) -> Vec<Mark> {
    take_matching(kept, |_, at| at.elapsed() >= MARK_TTL)
}

/// Removes and returns the marks `pred` selects, keeping the others in order.
fn take_matching(
    kept: &mut Vec<(Mark, Instant)>,
    pred: impl Fn(&Mark, Instant) -> bool,
) -> Vec<Mark> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < kept.len() {
        if pred(&kept[i].0, kept[i].1) {
            out.push(kept.remove(i).0);
        } else {
            i += 1;
        }
    }
    out
}

/// Returns a dropped mark's page to `ABSENT` and its frame to the pool, then
/// wakes any vCPU that faulted on it meanwhile (it faults again and is served
/// as usual). A mark fetched from a memory node counts as a prefetched page
/// wasted.
fn release(s: &Shared, m: &Mark) {
    let page = m.page;
    s.state[page].store(ABSENT, Release);
    s.release_frames(1);
    s.stats.readahead_dropped.fetch_add(1, Relaxed);
    if m.data.is_some() {
        s.stats.prefetch_wasted.fetch_add(1, Relaxed);
    }
    let _ = s.uffd.wake(s.addr(page) as *mut _, super::uffd::PAGE);
}

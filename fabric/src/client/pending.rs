//! Requests in flight: what `submit_read` and `submit_write` return.

use super::slots::{self, Reply};
use super::{Backend, ClientError, PageClient, Presence, rdma};
use crate::link_model::wait_until;
use crate::proto::PAGE_SIZE;
use std::time::Instant;

/// A submitted read; [`PendingRead::wait`] collects it. Dropping it without waiting
/// waits and discards the reply, so its slot is always released.
#[must_use = "a pending read holds a request slot until waited for"]
pub struct PendingRead<'c> {
    pub(super) client: &'c PageClient,
    pub(super) ticket: Option<slots::Ticket>,
    pub(super) count: usize,
    /// On an ideal node: the pages, read when waited for, and when the
    /// modelled link delivers them.
    pub(super) ideal: Option<(Vec<u64>, Option<Instant>)>,
    /// On an RDMA node: the one-sided read.
    pub(super) rdma: Option<rdma::Pending>,
}

/// A submitted write; [`PendingWrite::wait`] collects it (dropping it waits too).
#[must_use = "a pending write holds a request slot until waited for"]
pub struct PendingWrite<'c> {
    pub(super) client: &'c PageClient,
    pub(super) ticket: Option<slots::Ticket>,
    /// On an ideal node: when the modelled link acknowledges the write.
    pub(super) ideal_ack: Option<Instant>,
}

impl PendingRead<'_> {
    /// Waits for the pages and copies them into `out` (`count` × 4096 bytes).
    pub fn wait(mut self, out: &mut [u8]) -> Result<Presence, ClientError> {
        if out.len() != self.count * PAGE_SIZE {
            // Dropping `self` still collects the reply, so the slot is released.
            return Err(ClientError::InvalidRequest(format!(
                "read buffer is {} bytes, need {}",
                out.len(),
                self.count * PAGE_SIZE
            )));
        }
        if let (Backend::Remote(r), Some(p)) = (&self.client.backend, self.rdma.take()) {
            return rdma::wait(self.client, r, p, out);
        }
        match (&self.client.backend, self.ticket.take(), self.ideal.take()) {
            (Backend::Remote(r), Some(t), _) => self.client.finish(r, t, |d| d.copy_pages(out)),
            (Backend::Ideal(i), _, Some((gpns, at))) => {
                if let Some(at) = at {
                    wait_until(at);
                }
                let mut present = 0u64;
                for (k, (&gpn, page)) in
                    gpns.iter().zip(out.chunks_exact_mut(PAGE_SIZE)).enumerate()
                {
                    if i.store.read(gpn, page) {
                        present |= 1 << k;
                    }
                }
                Ok(Presence(present))
            }
            _ => unreachable!("a pending read is made with its backend's state"),
        }
    }
}

impl Drop for PendingRead<'_> {
    fn drop(&mut self) {
        if let (Some(p), Backend::Remote(r)) = (self.rdma.take(), &self.client.backend) {
            // Its slot is released once its completions are in.
            let mut scratch = vec![0u8; self.count * PAGE_SIZE];
            let _ = rdma::wait(self.client, r, p, &mut scratch);
        }
        if let (Some(t), Backend::Remote(r)) = (self.ticket.take(), &self.client.backend) {
            let _ = self.client.finish(r, t, |_| ());
        }
    }
}

impl PendingWrite<'_> {
    /// Waits until the node has stored the pages.
    pub fn wait(mut self) -> Result<(), ClientError> {
        let client = self.client;
        match (&client.backend, self.ticket.take()) {
            (Backend::Remote(r), Some(t)) => match client.finish(r, t, |d| d.reply.take())? {
                Reply::Count(_) => Ok(()),
                other => Err(client.unexpected(other)),
            },
            (Backend::Ideal(_), _) => {
                if let Some(at) = self.ideal_ack.take() {
                    wait_until(at);
                }
                Ok(())
            }
            (Backend::Remote(_), None) => unreachable!("a remote write is made with its ticket"),
        }
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        if let (Some(t), Backend::Remote(r)) = (self.ticket.take(), &self.client.backend) {
            let _ = self.client.finish(r, t, |_| ());
        }
    }
}

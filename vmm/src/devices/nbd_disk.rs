//! A virtio-blk backend on a remote storage node: `--disk nbd://HOST:PORT/EXPORT`.
//!
//! Speaks NBD through [`nbd_proto::client::NbdClient`], so the node can be
//! our `storagenode` or any NBD server (`qemu-nbd`, `nbdkit`). A batch of guest
//! requests ([`BlockBackend::run_batch`]) is submitted at once, with every request
//! in flight together (pipelined on one connection); the batch returns when the
//! node has answered all of them, and only then does the guest see them complete.
//! A flush is submitted only after every write before it in the batch has been
//! acknowledged, so it covers them (NBD's flush covers completed writes).
//!
//! ## A failing node
//!
//! Requests that fail (the node died, closed the connection, did not answer within
//! [`IO_TIMEOUT`], or answered with an error) complete with an error, which the
//! guest sees as `VIRTIO_BLK_S_IOERR`; nothing hangs. The failure is logged with the
//! node's address. After a connection failure the backend reconnects on the next
//! request, with exponential backoff (from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]):
//! within the backoff period requests fail at once instead of each waiting for a
//! connect timeout. A reconnected export must have the same size.

use super::virtio_blk::{BlockBackend, BlockOp, OpKind};
use fabric::client::error_chain;
use nbd_proto::client::{ClientConfig, ClientError, NbdClient, Request};
use std::io;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// With requests outstanding, a node silent for this long is declared dead.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before reconnecting after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest piece a guest request is split into (a virtio-blk request is at most
/// 4 MiB; servers accept up to their advertised maximum, often 32 MiB).
const MAX_PIECE: usize = 1 << 20;

/// `nbd://HOST:PORT/EXPORT` parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// `HOST:PORT`.
    pub addr: String,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// Why an `nbd://` address was refused. Each names the address as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdUrlError {
    /// Not an `nbd://` address.
    #[error("{0:?} is not an nbd://HOST:PORT/EXPORT address")]
    NotNbd(String),
    /// The storage node is not `HOST:PORT`.
    #[error("{0:?}: the storage node must be given as HOST:PORT (nbd://HOST:PORT/EXPORT)")]
    NotHostPort(String),
    /// The export name is too long.
    #[error("{0:?}: export name longer than 4096 bytes")]
    ExportTooLong(String),
}

impl std::str::FromStr for NbdUrl {
    type Err = NbdUrlError;
    fn from_str(s: &str) -> Result<Self, NbdUrlError> {
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| NbdUrlError::NotNbd(s.into()))?;
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
        if !port_ok {
            return Err(NbdUrlError::NotHostPort(s.into()));
        }
        if export.len() > 4096 {
            return Err(NbdUrlError::ExportTooLong(s.into()));
        }
        Ok(NbdUrl {
            addr: addr.into(),
            export: export.into(),
        })
    }
}

impl std::fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd://{}/{}", self.addr, self.export)
    }
}

/// A disk on an NBD server.
pub struct NbdBackend {
    url: NbdUrl,
    config: ClientConfig,
    client: Option<NbdClient>,
    size: u64,
    read_only: bool,
    piece: usize,
    backoff: Duration,
    next_try: Instant,
    /// Requests that failed (for logs and tests).
    pub failures: u64,
    /// Successful reconnects.
    pub reconnects: u64,
}

impl NbdBackend {
    /// Connects to the export; an unreachable node or unknown export is an error
    /// naming it. `read_only` opens the disk read-only even if the export is not.
    pub fn connect(url: &NbdUrl, read_only: bool) -> Result<Self, ClientError> {
        let config = ClientConfig {
            io_timeout: Some(IO_TIMEOUT),
            connect_timeout: Duration::from_secs(3),
            ..ClientConfig::default()
        };
        let client = NbdClient::connect_with(&url.addr, &url.export, &config)?;
        let info = client.info().clone();
        let piece = match info.max_block {
            0 => MAX_PIECE,
            m => (m as usize).min(MAX_PIECE),
        };
        Ok(NbdBackend {
            url: url.clone(),
            config,
            size: info.size,
            read_only: read_only || info.read_only(),
            piece: piece.max(512),
            client: Some(client),
            backoff: BACKOFF_MIN,
            next_try: Instant::now(),
            failures: 0,
            reconnects: 0,
        })
    }

    /// The connection, reconnecting if it was lost and the backoff has passed.
    fn client(&mut self) -> io::Result<NbdClient> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let now = Instant::now();
        if now < self.next_try {
            return Err(io::Error::other(format!(
                "storage node {} is down (next reconnect attempt in {:?})",
                self.url.addr,
                self.next_try - now
            )));
        }
        match NbdClient::connect_with(&self.url.addr, &self.url.export, &self.config) {
            Ok(c) if c.size() != self.size => {
                self.retry_later();
                Err(io::Error::other(format!(
                    "storage node {}: export {:?} is now {} bytes, was {}: not using it",
                    self.url.addr,
                    self.url.export,
                    c.size(),
                    self.size
                )))
            }
            Ok(c) => {
                log::warn!("disk {}: reconnected to the storage node", self.url);
                self.reconnects += 1;
                self.backoff = BACKOFF_MIN;
                self.client = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.retry_later();
                log::error!(
                    "disk {}: reconnect failed: {}; next attempt in {:?}",
                    self.url,
                    error_chain(&e),
                    self.backoff
                );
                Err(io::Error::other(error_chain(&e)))
            }
        }
    }

    fn retry_later(&mut self) {
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Notes a failed request; a lost connection is dropped (reconnect later).
    fn failed(&mut self, e: &ClientError) {
        self.failures += 1;
        let lost = !matches!(
            e,
            ClientError::Request { .. }
                | ClientError::Invalid { .. }
                | ClientError::ReadOnly { .. }
        );
        if lost && self.client.take().is_some() {
            log::error!(
                "disk {}: storage node {} failed: {}; its requests complete with I/O errors, reconnecting with backoff",
                self.url,
                self.url.addr,
                error_chain(e)
            );
            self.retry_later();
        }
    }

    /// Submits the pieces of ops `range` and waits for all of them.
    fn run_group(&mut self, ops: &mut [BlockOp]) {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => {
                for op in ops.iter_mut() {
                    op.result = Err(io::Error::new(e.kind(), e.to_string()));
                }
                return;
            }
        };
        let (tx, rx) = mpsc::channel();
        let mut expected = 0usize;
        let mut first_error: Vec<Option<ClientError>> = (0..ops.len()).map(|_| None).collect();
        for (i, op) in ops.iter().enumerate() {
            let pieces: Vec<(u64, usize, usize)> = match op.kind {
                OpKind::Flush => vec![(0, 0, 0)],
                _ => (0..op.buf.len())
                    .step_by(self.piece)
                    .map(|at| {
                        let n = self.piece.min(op.buf.len() - at);
                        (op.offset + at as u64, at, n)
                    })
                    .collect(),
            };
            for (offset, at, n) in pieces {
                let req = match op.kind {
                    OpKind::Read => Request::Read {
                        offset,
                        buf: vec![0; n],
                    },
                    OpKind::Write => Request::Write {
                        offset,
                        data: op.buf[at..at + n].to_vec(),
                        fua: false,
                    },
                    OpKind::Flush => Request::Flush,
                };
                let tx = tx.clone();
                match client.submit(req, move |c| {
                    let _ = tx.send((i, at, c));
                }) {
                    Ok(_) => expected += 1,
                    Err(e) => {
                        first_error[i].get_or_insert(e);
                    }
                }
            }
        }
        drop(tx);
        for _ in 0..expected {
            let Ok((i, at, c)) = rx.recv() else { break };
            match c.result {
                Ok(()) => {
                    if ops[i].kind == OpKind::Read {
                        ops[i].buf[at..at + c.buf.len()].copy_from_slice(&c.buf);
                    }
                }
                Err(e) => {
                    first_error[i].get_or_insert(e);
                }
            }
        }
        for (op, err) in ops.iter_mut().zip(first_error) {
            op.result = match err {
                None => Ok(()),
                Some(e) => {
                    self.failed(&e);
                    Err(io::Error::other(error_chain(&e)))
                }
            };
        }
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Read, offset, vec![0; buf.len()])];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result?;
        buf.copy_from_slice(&op.buf);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Write, offset, buf.to_vec())];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Flush, 0, Vec::new())];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        self.url.to_string()
    }
    /// Everything between two flushes goes out at once; a flush goes out after the
    /// writes before it were acknowledged.
    fn run_batch(&mut self, ops: &mut [BlockOp]) {
        let mut start = 0;
        while start < ops.len() {
            let end = match ops[start..].iter().position(|o| o.kind == OpKind::Flush) {
                Some(0) => start + 1,
                Some(n) => start + n,
                None => ops.len(),
            };
            self.run_group(&mut ops[start..end]);
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let u: NbdUrl = "nbd://127.0.0.1:7100/disk0".parse().unwrap();
        assert_eq!(u.addr, "127.0.0.1:7100");
        assert_eq!(u.export, "disk0");
        assert_eq!(u.to_string(), "nbd://127.0.0.1:7100/disk0");
        let d: NbdUrl = "nbd://host:10809".parse().unwrap();
        assert_eq!(d.export, "");
        for bad in [
            "nbd://",
            "nbd://host/x",
            "nbd://:1/x",
            "nbd://h:0/x",
            "http://h:1/x",
        ] {
            let e = bad.parse::<NbdUrl>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}

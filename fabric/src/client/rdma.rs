//! The page client over an `rdma://HOST:PORT` node: the TCP connection
//! carries the handshake and every two-sided message, and page reads are
//! one-sided RDMA READs ([`crate::transport::rdma`]).
//!
//! Without the `rdma` feature an `rdma://` address fails to connect with an
//! error saying so.

#[cfg(feature = "rdma")]
use super::{Backend, PendingRead, Reply, error_chain};
use super::{ClientConfig, ClientError, Inner, PageClient, Presence};
#[cfg(feature = "rdma")]
use crate::link_model::wait_until;
#[cfg(feature = "rdma")]
use crate::proto::{HEADER_LEN, Message, Opcode, PAGE_SIZE};
use crate::transport::TransportError;
#[cfg(feature = "rdma")]
use crate::transport::rdma::{PostedRead, RdmaReader, ReaderConfig, RemoteChunk};
#[cfg(feature = "rdma")]
use std::time::Instant;

/// The prefix of an RDMA node's address.
pub const RDMA_SCHEME: &str = "rdma://";

/// A one-sided read in flight.
#[cfg(feature = "rdma")]
pub(super) struct Pending {
    posted: PostedRead,
    /// When the modelled link delivers the pages (`None` without a model).
    visible_at: Option<Instant>,
}

/// A one-sided read in flight (none without the `rdma` feature).
#[cfg(not(feature = "rdma"))]
pub(super) enum Pending {}

/// Connects to `addr` = `rdma://HOST:PORT`: TCP to HOST:PORT, the handshake,
/// then the queue pair.
#[cfg(feature = "rdma")]
pub(super) fn connect(addr: &str, config: &ClientConfig) -> Result<PageClient, ClientError> {
    let hostport = &addr[RDMA_SCHEME.len()..];
    let link = crate::transport::tcp::TcpLink::connect(hostport, config.connect_timeout).map_err(
        |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        },
    )?;
    let client = PageClient::over_link_named(Box::new(link), config, addr)?;
    let Backend::Remote(inner) = &client.backend else {
        unreachable!("a link makes a remote client")
    };
    let failed = |e: crate::transport::rdma::RdmaError| ClientError::Connect {
        addr: addr.to_string(),
        source: TransportError::Rdma {
            addr: addr.to_string(),
            reason: error_chain(&e),
        },
    };
    let reader = RdmaReader::connect(
        addr,
        &ReaderConfig {
            device: config.rdma_device.clone(),
            slots: config.max_in_flight.min(64),
            timeout: config.reply_timeout,
        },
        |mine| match client.call(
            inner,
            &Message::RdmaConnect { endpoint: mine },
            Opcode::RdmaConnectOk,
        ) {
            Ok(Reply::RdmaConnected(node, chunk_pages)) => Ok((node, chunk_pages)),
            Ok(other) => Err(client.unexpected(other)),
            Err(e) => Err(e),
        },
    )
    .map_err(failed)?;
    if inner.rdma.set(reader).is_err() {
        unreachable!("the reader is set once, here");
    }
    Ok(client)
}

/// Without the `rdma` feature: an error naming the address.
#[cfg(not(feature = "rdma"))]
pub(super) fn connect(addr: &str, _config: &ClientConfig) -> Result<PageClient, ClientError> {
    Err(ClientError::Connect {
        addr: addr.to_string(),
        source: TransportError::NoRdma {
            addr: addr.to_string(),
        },
    })
}

/// Posts one-sided reads of `gpns`, first asking the node where any chunk
/// not yet known lies.
#[cfg(feature = "rdma")]
pub(super) fn submit_read<'c>(
    client: &'c PageClient,
    inner: &Inner,
    reader: &RdmaReader,
    gpns: &[u64],
) -> Result<Option<PendingRead<'c>>, ClientError> {
    if let Some(reason) = inner.slots.failure().or_else(|| reader.failure()) {
        return Err(client.lost(reason));
    }
    // Chunks the VM never stored a page in read as zeros; they are asked
    // for again next time (a write may have made them since).
    let mut absent: Vec<u64> = Vec::new();
    for &gpn in gpns {
        let chunk = reader.chunk_of(gpn);
        if reader.chunk(chunk).is_some() || absent.contains(&chunk) {
            continue;
        }
        match client.call(inner, &Message::MapRegion { chunk }, Opcode::MapRegionOk)? {
            Reply::Region(c, _, 0, _) if c == chunk => absent.push(chunk),
            Reply::Region(c, addr, len, rkey) if c == chunk => {
                if len != reader.chunk_pages() * PAGE_SIZE as u64 || addr.checked_add(len).is_none()
                {
                    return Err(fail(
                        client,
                        inner,
                        reader,
                        format!("the node mapped chunk {chunk} at {addr:#x} with {len} bytes"),
                    ));
                }
                reader.learn(chunk, RemoteChunk { addr, rkey });
            }
            other => return Err(client.unexpected(other)),
        }
    }
    let Some(posted) = reader
        .post(gpns, |chunk| reader.chunk(chunk))
        .map_err(|e| fail(client, inner, reader, error_chain(&e)))?
    else {
        // Every bounce slot is held by a read not yet waited for: this one
        // goes two-sided (`ReadPages`), so no caller waits on another's wait.
        return Ok(None);
    };
    let visible_at = inner.shaper.as_ref().map(|s| {
        s.on_recv(
            posted.pages() * PAGE_SIZE,
            s.on_send(HEADER_LEN * posted.pages().max(1)),
        )
    });
    Ok(Some(PendingRead {
        client,
        ticket: None,
        count: gpns.len(),
        ideal: None,
        rdma: Some(Pending { posted, visible_at }),
    }))
}

/// The reader failed: the whole connection is failed, so that the caller
/// takes the node-failure path, as on a lost TCP connection.
#[cfg(feature = "rdma")]
fn fail(client: &PageClient, inner: &Inner, reader: &RdmaReader, why: String) -> ClientError {
    reader.fail(why.clone());
    inner.slots.fail(format!("RDMA: {why}"));
    inner.link.shutdown();
    client.lost(format!("RDMA: {why}"))
}

/// Waits for a one-sided read and copies the pages into `out`.
#[cfg(feature = "rdma")]
pub(super) fn wait(
    client: &PageClient,
    inner: &Inner,
    p: Pending,
    out: &mut [u8],
) -> Result<Presence, ClientError> {
    let reader = inner.rdma.get().expect("a one-sided read has a reader");
    let present = reader
        .finish(p.posted, out)
        .map_err(|e| fail(client, inner, reader, error_chain(&e)))?;
    if let Some(at) = p.visible_at {
        wait_until(at);
    }
    Ok(Presence(present))
}

/// Without the `rdma` feature there is no one-sided read to wait for.
#[cfg(not(feature = "rdma"))]
pub(super) fn wait(
    _client: &PageClient,
    _inner: &Inner,
    p: Pending,
    _out: &mut [u8],
) -> Result<Presence, ClientError> {
    match p {}
}

/// Pages read one-sided so far, on an RDMA node.
#[cfg(feature = "rdma")]
pub(super) fn pages_read(inner: &Inner) -> Option<u64> {
    inner.rdma.get().map(RdmaReader::pages_read)
}

/// Pages read one-sided so far: none without the `rdma` feature.
#[cfg(not(feature = "rdma"))]
pub(super) fn pages_read(_inner: &Inner) -> Option<u64> {
    None
}

/// Why the RDMA side failed, if it has.
#[cfg(feature = "rdma")]
pub(super) fn failure(inner: &Inner) -> Option<String> {
    inner.rdma.get().and_then(RdmaReader::failure)
}

/// Why the RDMA side failed: never without the `rdma` feature.
#[cfg(not(feature = "rdma"))]
pub(super) fn failure(_inner: &Inner) -> Option<String> {
    None
}

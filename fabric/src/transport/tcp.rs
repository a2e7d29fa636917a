//! TCP transport: `TCP_NODELAY`, one vectored write per frame (header and page data
//! go out in one `writev`, never copied into a staging buffer), blocking reads.

use super::{Link, TransportError};
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A fabric link over one TCP connection.
#[derive(Debug)]
pub struct TcpLink {
    stream: TcpStream,
    peer: String,
}

impl TcpLink {
    /// Connects to `addr` (`host:port`), trying each resolved address within `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, TransportError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Resolve {
                addr: addr.to_string(),
                source,
            })?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address resolved");
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => return Self::from_stream(stream, addr.to_string()),
                Err(e) => last = e,
            }
        }
        Err(TransportError::Connect {
            addr: addr.to_string(),
            source: last,
        })
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream, peer: String) -> Result<Self, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(|source| TransportError::Io {
                peer: peer.clone(),
                source,
            })?;
        Ok(TcpLink { stream, peer })
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Maps an I/O error; a socket timeout (`timeout`, as configured) becomes
    /// [`TransportError::TimedOut`].
    fn failed(
        &self,
        e: std::io::Error,
        timeout: std::io::Result<Option<Duration>>,
    ) -> TransportError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                TransportError::TimedOut {
                    peer: self.peer.clone(),
                    after: timeout.ok().flatten().unwrap_or_default(),
                }
            }
            _ => self.io(e),
        }
    }

    fn io(&self, source: std::io::Error) -> TransportError {
        TransportError::Io {
            peer: self.peer.clone(),
            source,
        }
    }
}

impl Link for TcpLink {
    fn send_vectored(&self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), TransportError> {
        // Skip leading empty slices so that `advance_slices` never sees a zero write.
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match (&self.stream).write_vectored(bufs) {
                Ok(0) => {
                    return Err(self.io(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "connection closed while sending",
                    )));
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failed(e, self.stream.write_timeout())),
            }
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            match (&self.stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failed(e, self.stream.read_timeout())),
            }
        }
    }

    fn set_send_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.stream
            .set_write_timeout(timeout)
            .map_err(|e| self.io(e))
    }

    fn set_recv_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| self.io(e))
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

//! [`Stream`]: the byte stream an NBD connection runs on once its handshake is
//! done or while it is under way: the TCP connection itself, or, after
//! `NBD_OPT_STARTTLS`, the plaintext end of a TLS relay ([`crate::tls::Relay`]),
//! a Unix socket pair whose other end the relay's threads encrypt to and decrypt
//! from the TCP connection.
//!
//! Both ends of NBD (the storage node's connection threads, the client's reader
//! and writers) use a `Stream` the same way they used a `TcpStream`: blocking
//! reads and writes, clones for the reader and the writer, `shutdown` to end it.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connection's byte stream: plain TCP, or the plaintext end of a TLS relay.
#[derive(Debug)]
pub enum Stream {
    /// The TCP connection, in plaintext.
    Tcp(TcpStream),
    /// The plaintext end of a TLS relay over the TCP connection.
    Tls(UnixStream),
}

macro_rules! both {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Tcp($x) => $e,
            Stream::Tls($x) => $e,
        }
    };
}

impl Stream {
    /// Another handle on the same stream (for a reader and a writer).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// Shuts down the read side, the write side or both, for every handle.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => s.shutdown(how))
    }

    /// Bounds each read (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_read_timeout(t))
    }

    /// Bounds each write (`None`: block forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_write_timeout(t))
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(self, s => s.read(buf))
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).read(buf))
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(self, s => s.write(buf))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        both!(self, s => s.write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(*self, s => (&*s).write(buf))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        both!(*self, s => (&*s).write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

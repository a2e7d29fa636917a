//! The client's error type.

use crate::wire::{Errno, Opt, Rep, WireError};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Client failures. Every variant names the server's address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("cannot connect to NBD server {addr}")]
    Connect {
        /// The server.
        addr: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The socket failed during the handshake.
    #[error("{during} with NBD server {addr} failed")]
    Io {
        /// The server.
        addr: String,
        /// What was going on.
        during: &'static str,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// TLS could not be started: the server refused `NBD_OPT_STARTTLS`, or the TLS
    /// handshake failed (e.g. its certificate is not trusted).
    #[error("TLS with NBD server {addr} failed")]
    Tls {
        /// The server.
        addr: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The server sent a malformed message.
    #[error("NBD server {addr} sent a malformed message")]
    Protocol {
        /// The server.
        addr: String,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The server sent a well-formed message that makes no sense here.
    #[error("NBD server {addr} broke the protocol: {what}")]
    Unexpected {
        /// The server.
        addr: String,
        /// What happened.
        what: String,
    },
    /// The server has no such export.
    #[error("NBD server {addr} has no export {export:?}: {message}")]
    UnknownExport {
        /// The server.
        addr: String,
        /// The export asked for.
        export: String,
        /// The server's message.
        message: String,
    },
    /// The server refused an option.
    #[error("NBD server {addr} refused {option} with {reply}: {message}")]
    Refused {
        /// The server.
        addr: String,
        /// The option.
        option: Opt,
        /// The error reply.
        reply: Rep,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD server {addr} failed the request with {errno}")]
    Request {
        /// The server.
        addr: String,
        /// The error.
        errno: Errno,
    },
    /// The connection was lost with requests outstanding.
    #[error("connection to NBD server {addr} lost")]
    Disconnected {
        /// The server.
        addr: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The server did not answer in time.
    #[error("NBD server {addr} did not answer within {timeout:?}")]
    TimedOut {
        /// The server.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The client is shutting the connection down.
    #[error("the connection to NBD server {addr} is closing")]
    Closed {
        /// The server.
        addr: String,
    },
    /// The request is not valid for this export (checked before sending).
    #[error("invalid request for NBD server {addr}: {reason}")]
    Invalid {
        /// The server.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// A write to a read-only export.
    #[error("export {export:?} on NBD server {addr} is read-only")]
    ReadOnly {
        /// The server.
        addr: String,
        /// The export.
        export: String,
    },
    /// The server did not advertise support for this.
    #[error("NBD server {addr} does not support {what}")]
    Unsupported {
        /// The server.
        addr: String,
        /// The feature.
        what: &'static str,
    },
}

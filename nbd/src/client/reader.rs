//! The reader thread: matches replies to requests and completes them; on any
//! failure, fails every outstanding request.

use super::{ClientError, Handle, Shared, deliver};
use crate::stream::Stream;
use crate::wire::{Cmd, Errno, SIMPLE_REPLY_LEN, SimpleReply};
use std::io::{self, Read};
use std::sync::Arc;

/// Reads exactly `buf.len()` bytes of a reply. `at_boundary`: a timeout with no
/// request outstanding is not an error (the connection is just idle).
fn read_reply(
    s: &Shared,
    stream: &mut Stream,
    buf: &mut [u8],
    at_boundary: bool,
) -> Result<(), ClientError> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => {
                let closing = s.slots.lock().unwrap().closing;
                if closing && done == 0 && at_boundary {
                    return Err(ClientError::Closed {
                        addr: s.addr.clone(),
                    });
                }
                return Err(ClientError::Disconnected {
                    addr: s.addr.clone(),
                    source: Arc::new(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )),
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let idle = s.slots.lock().unwrap().in_flight == 0;
                if !(idle && at_boundary && done == 0) {
                    return Err(ClientError::TimedOut {
                        addr: s.addr.clone(),
                        timeout: s.config.io_timeout.unwrap_or_default(),
                    });
                }
            }
            Err(e) => {
                return Err(ClientError::Disconnected {
                    addr: s.addr.clone(),
                    source: Arc::new(e),
                });
            }
        }
    }
    Ok(())
}

pub(super) fn reader_loop(s: &Shared, mut stream: Stream) {
    let err = loop {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = read_reply(s, &mut stream, &mut hdr, true) {
            break e;
        }
        let reply = match SimpleReply::decode(&hdr) {
            Ok(r) => r,
            Err(e) => {
                break ClientError::Protocol {
                    addr: s.addr.clone(),
                    source: e,
                };
            }
        };
        let h = Handle(reply.handle);
        let mut slots = s.slots.lock().unwrap();
        let cmd = match slots.waiting_cmd(h) {
            Some(c) => c,
            None => {
                break ClientError::Unexpected {
                    addr: s.addr.clone(),
                    what: format!("reply for unknown handle {:#x}", reply.handle),
                };
            }
        };
        let ready = if reply.error != 0 {
            let errno = Errno(reply.error);
            slots.complete(
                h,
                Err(ClientError::Request {
                    addr: s.addr.clone(),
                    errno,
                }),
                None,
            )
        } else if cmd == Some(Cmd::READ) {
            let mut buf = slots.take_buf(h);
            drop(slots);
            if let Err(e) = read_reply(s, &mut stream, &mut buf, false) {
                s.slots.lock().unwrap().put_buf(h, buf);
                break e;
            }
            slots = s.slots.lock().unwrap();
            slots.complete(h, Ok(()), Some(buf))
        } else {
            slots.complete(h, Ok(()), None)
        };
        drop(slots);
        deliver(s, ready.into_iter());
    };
    if !matches!(err, ClientError::Closed { .. }) {
        log::debug!("{}", error_chain(&err));
    }
    s.fail(err);
}

/// Formats an error with its sources: `outer: inner: innermost` (as
/// `fabric::client::error_chain`, which this crate does not depend on).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

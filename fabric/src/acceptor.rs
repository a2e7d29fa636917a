//! Accepting connections for the node daemons (`memnode`, `storagenode`): one
//! thread per connection, a limit on open connections, a registry of the open
//! ones, and a shutdown that another thread (a signal thread, a test) triggers.
//!
//! The daemons differ in what they serve and in how they stop: the memory node
//! closes its connections at once, the storage node first lets each answer the
//! requests it has taken. [`Acceptor::run`] takes the serving part as a closure;
//! [`ShutdownHandle::shutdown`] takes the stopping part as a [`Shutdown`] mode,
//! and [`Acceptor::finish`] waits for the connection threads with an optional
//! grace period.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The open connections and the accept counters, shared with connection threads.
#[derive(Debug, Default)]
pub struct Connections {
    shutting_down: AtomicBool,
    open: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
    accepted: AtomicU64,
}

impl Connections {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.lock().unwrap().len() as u64
    }

    /// Connections accepted since start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// True once a shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    fn shutdown_all(&self, how: Shutdown) {
        for s in self.open.lock().unwrap().values() {
            let _ = s.shutdown(how);
        }
    }
}

/// A bound listener and its connections.
pub struct Acceptor {
    listener: TcpListener,
    conns: Arc<Connections>,
    max_connections: usize,
    /// How [`ShutdownHandle::shutdown`] ends the open connections.
    how: Shutdown,
}

/// Stops an [`Acceptor`] from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    conns: Arc<Connections>,
    listener_fd: i32,
    how: Shutdown,
}

impl ShutdownHandle {
    /// Stops accepting and shuts every open connection down (`how`, as given to
    /// [`Acceptor::bind`]); [`Acceptor::run`] then returns.
    pub fn shutdown(&self) {
        if self.conns.shutting_down.swap(true, Relaxed) {
            return;
        }
        // SAFETY: shutdown(2) on the listener's fd, which `Acceptor` keeps open
        // until it is dropped; on Linux it makes the blocked accept(2) return.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        self.conns.shutdown_all(self.how);
    }

    /// Shuts down on the first SIGINT or SIGTERM, from a thread of its own (the
    /// daemons' clean stop).
    pub fn on_termination_signals(self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log::info!("signal {sig}: shutting down");
                    self.shutdown();
                }
            })?;
        Ok(())
    }
}

impl Acceptor {
    /// Binds `addr`. At most `max_connections` are served at once; a shutdown
    /// ends open connections with `how` (`Both`: at once; `Read`: after the
    /// replies already due are sent).
    pub fn bind(addr: &str, max_connections: usize, how: Shutdown) -> std::io::Result<Self> {
        Ok(Acceptor {
            listener: TcpListener::bind(addr)?,
            conns: Arc::new(Connections::default()),
            max_connections: max_connections.max(1),
            how,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The connection registry and counters.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    /// A handle that stops [`Acceptor::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            conns: self.conns.clone(),
            listener_fd: self.listener.as_raw_fd(),
            how: self.how,
        }
    }

    /// Accepts until shut down. Each connection is served by `serve` on its own
    /// thread (named `conn-PEER`); one over the limit goes to `refuse` on this
    /// thread instead. Returns the connection threads, which may still run: pass
    /// them to [`Acceptor::finish`].
    pub fn run<S, R>(&self, serve: S, mut refuse: R) -> Vec<JoinHandle<()>>
    where
        S: Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
        R: FnMut(TcpStream, SocketAddr),
    {
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) => {
                    if self.conns.shutting_down() {
                        break;
                    }
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.conns.shutting_down() {
                break;
            }
            threads.retain(|t| !t.is_finished());
            self.conns.accepted.fetch_add(1, Relaxed);
            let id = self.conns.next.fetch_add(1, Relaxed);
            {
                let mut open = self.conns.open.lock().unwrap();
                if open.len() >= self.max_connections {
                    drop(open);
                    refuse(stream, peer);
                    continue;
                }
                match stream.try_clone() {
                    Ok(s) => {
                        open.insert(id, s);
                    }
                    Err(e) => {
                        log::warn!("{peer}: cannot register connection: {e}");
                        continue;
                    }
                }
            }
            let (conns, serve) = (self.conns.clone(), serve.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("conn-{peer}"))
                .spawn(move || {
                    serve(stream, peer);
                    conns.open.lock().unwrap().remove(&id);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    log::error!("{peer}: cannot start a connection thread: {e}");
                    self.conns.open.lock().unwrap().remove(&id);
                }
            }
        }
        // Connections registered after the handle's sweep get the same treatment.
        self.conns.shutdown_all(self.how);
        threads
    }

    /// Waits for the connection threads. With a `grace` period, connections
    /// still open when it ends are closed hard first (and counted in the
    /// returned number).
    pub fn finish(&self, threads: Vec<JoinHandle<()>>, grace: Option<Duration>) -> usize {
        let mut stuck = 0;
        if let Some(grace) = grace {
            let end = Instant::now() + grace;
            while threads.iter().any(|t| !t.is_finished()) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            stuck = self.conns.open.lock().unwrap().len();
            if stuck > 0 {
                self.conns.shutdown_all(Shutdown::Both);
            }
        }
        for t in threads {
            let _ = t.join();
        }
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn echo_once(mut s: TcpStream, _: SocketAddr) {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            let _ = s.write_all(&b);
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn serves_refuses_over_the_limit_and_stops() {
        let a = Arc::new(Acceptor::bind("127.0.0.1:0", 1, Shutdown::Both).unwrap());
        let addr = a.local_addr();
        let refused = Arc::new(AtomicU64::new(0));
        let (a2, r2) = (a.clone(), refused.clone());
        let runner = std::thread::spawn(move || {
            let threads = a2.run(echo_once, move |_, _| {
                r2.fetch_add(1, Relaxed);
            });
            a2.finish(threads, None)
        });
        let conns = a.connections().clone();
        // Served: one byte echoed, then the connection is deregistered.
        let mut first = TcpStream::connect(addr).unwrap();
        first.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        first.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        wait_for("the first connection to end", || conns.open() == 0);
        // A connection that sends nothing holds the only place...
        let mut held = TcpStream::connect(addr).unwrap();
        wait_for("the held connection", || conns.open() == 1);
        // ...so the next one is refused.
        let _third = TcpStream::connect(addr).unwrap();
        wait_for("the refusal", || refused.load(Relaxed) == 1);
        assert_eq!(conns.accepted(), 3);
        // Shutdown ends the held connection (its thread sees EOF) and `run`.
        a.shutdown_handle().shutdown();
        assert_eq!(runner.join().unwrap(), 0);
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
        assert!(conns.shutting_down());
        assert_eq!(conns.open(), 0);
    }
}

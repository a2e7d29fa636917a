//! A client's whole byte stream through a connection's real path (handshake,
//! then transmission) over loopback TCP, for the fuzz targets in `fuzz/` (see
//! docs/fuzzing.md). Not part of the node's interface.

use super::{ConnContext, NodeStats, ServerConfig};
use crate::volume::VolumeDir;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

/// The served volumes: `disk` (1 MiB, writable) and `ro` (64 KiB, read-only).
pub const VOLUMES: [(&str, u64); 2] = [("disk", 1 << 20), ("ro", 64 << 10)];

/// A storage node's connection handling without its acceptor.
pub struct Harness {
    ctx: ConnContext,
    listener: TcpListener,
    client: Sender<(TcpStream, Vec<u8>)>,
}

impl Harness {
    /// Opens (creating) the volume directory `dir` with [`VOLUMES`], starts two
    /// I/O workers and the client's threads. `dir` should be on a tmpfs: `FLUSH`
    /// syncs the volume.
    pub fn new(dir: &Path) -> Result<Harness, Box<dyn std::error::Error>> {
        // A fuzz target's `main` is libFuzzer's, which leaves SIGPIPE fatal; a
        // reply to a client that already closed must be an EPIPE, as in the node.
        // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let volumes = VolumeDir::open(dir, &["ro".to_string()])?;
        for (name, size) in VOLUMES {
            volumes.create(name, size)?;
        }
        let config = ServerConfig {
            listen: "127.0.0.1:0".into(),
            io_threads: 2,
            handshake_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(5),
            max_in_flight: 4,
            ..ServerConfig::default()
        };
        let ctx = ConnContext {
            volumes: Arc::new(volumes),
            stats: Arc::new(NodeStats::default()),
            pool: Arc::new(super::Pool::start(config.io_threads)?),
            config,
        };
        // The client: one thread sends the input then half-closes, another
        // reads the replies to the end, so neither side blocks the other.
        let (client, inputs) = channel::<(TcpStream, Vec<u8>)>();
        let (to_reader, readers) = channel::<TcpStream>();
        std::thread::spawn(move || {
            for (mut s, bytes) in inputs {
                if let Ok(r) = s.try_clone() {
                    let _ = to_reader.send(r);
                }
                let _ = s.write_all(&bytes);
                let _ = s.shutdown(Shutdown::Write);
            }
        });
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 256 << 10];
            for mut s in readers {
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            }
        });
        Ok(Harness {
            ctx,
            listener: TcpListener::bind("127.0.0.1:0")?,
            client,
        })
    }

    /// Sends `input` as a client's bytes (then closes the client's sending side)
    /// and serves the connection as the node does, until it ends.
    pub fn serve_client_bytes(&self, input: &[u8]) -> std::io::Result<()> {
        let client = TcpStream::connect(self.listener.local_addr()?)?;
        let (server, peer) = self.listener.accept()?;
        let _ = self.client.send((client, input.to_vec()));
        self.ctx.clone().serve(server, peer);
        Ok(())
    }
}

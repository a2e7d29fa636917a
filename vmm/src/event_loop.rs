//! An event loop on the rust-vmm `event-manager` crate, on a thread it owns.
//!
//! Subscribers (devices, the control API's action handler) register the file
//! descriptors they wait on (ioeventfds of virtio queues, backend completion
//! eventfds, an action channel's eventfd) when they are added; the loop thread
//! then calls them as those become readable. The work a subscriber does there
//! must not block: slow work is started there and its completion comes back as
//! another event.
//!
//! Two loops run in a VM: the I/O loop of the Linux guest's devices
//! ([`crate::linux::devices`]) and the control loop of the API
//! ([`crate::api`]), so that no device's backlog ever delays an API answer.
//! Dropping an [`EventLoop`] stops its thread and joins it.

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A subscriber shared between the loop and whoever else drives it (a device's
/// transport, for example).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Event loop failures.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll could not be set up.
    #[error("cannot create the {name} event loop")]
    Create {
        /// The loop.
        name: String,
        /// Why.
        #[source]
        source: event_manager::Error,
    },
    /// The stop eventfd could not be created.
    #[error("cannot create the {name} event loop's stop eventfd")]
    StopFd {
        /// The loop.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the {name} event loop thread")]
    Spawn {
        /// The loop.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Stops the loop when its eventfd is written.
struct Stopper {
    fd: EventFd,
    stopped: bool,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.stopped = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch an event loop's stop eventfd: {e}");
        }
    }
}

/// Collects subscribers, then runs them on a thread ([`EventLoopBuilder::start`]).
pub struct EventLoopBuilder {
    name: String,
    manager: EventManager<Subscriber>,
}

impl EventLoopBuilder {
    /// A loop whose thread will be called `name`.
    pub fn new(name: &str) -> Result<Self, EventLoopError> {
        let manager = EventManager::new().map_err(|source| EventLoopError::Create {
            name: name.into(),
            source,
        })?;
        Ok(EventLoopBuilder {
            name: name.into(),
            manager,
        })
    }

    /// Adds a subscriber: its `init` registers the descriptors it waits on.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Starts the loop thread.
    pub fn start(mut self) -> Result<EventLoop, EventLoopError> {
        let name = self.name.clone();
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| EventLoopError::StopFd {
            name: name.clone(),
            source,
        })?;
        let stop_here = stop.try_clone().map_err(|source| EventLoopError::StopFd {
            name: name.clone(),
            source,
        })?;
        let stopper = Arc::new(Mutex::new(Stopper {
            fd: stop_here,
            stopped: false,
        }));
        self.manager.add_subscriber(stopper.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut manager = self.manager;
                while !stopper.lock().unwrap().stopped {
                    if let Err(e) = manager.run() {
                        log::error!("event loop {}: {e}; stopping it", self.name);
                        break;
                    }
                }
            })
            .map_err(|source| EventLoopError::Spawn { name, source })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }
}

/// A running event loop; dropping it stops and joins its thread (the
/// subscribers are dropped with it).
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if self.stop.write(1).is_err() {
            log::error!("cannot stop an event loop; leaving its thread");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Echoes each value written to its eventfd into a channel.
    struct Echo {
        fd: EventFd,
        out: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(v) = self.fd.read() {
                let _ = self.out.send(v);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn subscribers_run_on_the_loop_thread_until_it_is_dropped() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut b = EventLoopBuilder::new("test-loop").unwrap();
        b.add(Arc::new(Mutex::new(Echo {
            fd: fd.try_clone().unwrap(),
            out: tx,
        })));
        let l = b.start().unwrap();
        fd.write(5).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            5
        );
        drop(l);
        // The subscriber went with the loop: its sender is gone.
        assert!(rx.recv().is_err());
    }
}

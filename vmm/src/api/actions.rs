//! The VMM's control loop: [`Action`]s from the API, served on an event-manager
//! loop (Firecracker's `VmmAction` is the model). Quick actions are answered on
//! the loop; an attach, which connects to a node and may block on the network,
//! runs on a worker thread that the loop owns and joins.

use super::{VmInfo, error, respond, respond_text};
use crate::control::RunControl;
use crate::excache::ExCache;
use crate::excache::placement::PlacementError;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What an API request asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// VM info and state.
    Info,
    /// Cache statistics.
    Stats,
    /// The memory nodes.
    Nodes,
    /// What happened to the memory nodes.
    Events,
    /// Attach the node at this address.
    Attach(String),
    /// Detach the node at this address (drained in the background).
    Detach(String),
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Prometheus metrics.
    Metrics,
    /// The OpenAPI document.
    OpenApi,
}

/// Outcomes of background detaches, by node address.
type DetachErrors = Arc<Mutex<HashMap<String, String>>>;

/// Serves actions on the control loop.
pub(super) struct Handler {
    info: VmInfo,
    cache: Arc<ExCache>,
    control: Arc<RunControl>,
    started: Instant,
    rx: mpsc::Receiver<(Action, tiny_http::Request)>,
    wake: EventFd,
    detach_errors: DetachErrors,
    /// Attach workers; finished ones are joined on the next event, the rest
    /// when the handler is dropped.
    workers: Vec<JoinHandle<()>>,
}

impl Handler {
    pub(super) fn new(
        info: VmInfo,
        cache: Arc<ExCache>,
        control: Arc<RunControl>,
        rx: mpsc::Receiver<(Action, tiny_http::Request)>,
        wake: EventFd,
    ) -> Self {
        Handler {
            info,
            cache,
            control,
            started: Instant::now(),
            rx,
            wake,
            detach_errors: DetachErrors::default(),
            workers: Vec::new(),
        }
    }

    fn serve(&mut self, action: Action, req: tiny_http::Request) {
        let (code, body) = match action {
            Action::Info => {
                let state = if self.control.is_paused() {
                    "paused"
                } else {
                    "running"
                };
                (
                    200,
                    json!({ "info": self.info, "state": state, "vcpus_parked": self.control.parked(), "uptime_s": self.started.elapsed().as_secs_f64() }),
                )
            }
            Action::Stats => (
                200,
                serde_json::to_value(self.cache.snapshot()).unwrap_or_default(),
            ),
            Action::Nodes => self.nodes(),
            Action::Events => (200, json!(self.cache.node_events())),
            Action::Pause => {
                self.control.set_paused(true);
                (200, json!({"state": "paused"}))
            }
            Action::Resume => {
                self.control.set_paused(false);
                (200, json!({"state": "running"}))
            }
            Action::Detach(addr) => self.detach(&addr),
            Action::Attach(addr) => return self.attach(addr, req),
            Action::Metrics => {
                let text = super::metrics::render(
                    &self.cache,
                    &self.control,
                    &self.info,
                    self.started.elapsed(),
                );
                return respond_text(req, fabric::prometheus::CONTENT_TYPE, text);
            }
            Action::OpenApi => {
                return respond_text(req, "application/yaml", super::OPENAPI.to_string());
            }
        };
        respond(req, code, &body);
    }

    fn nodes(&self) -> (u16, serde_json::Value) {
        let errors = self.detach_errors.lock().unwrap();
        let nodes: Vec<_> = self
            .cache
            .node_list()
            .into_iter()
            .map(|n| {
                let mut v = serde_json::to_value(&n).unwrap_or_default();
                if let Some(e) = errors.get(&n.addr) {
                    v["detach_error"] = json!(e);
                }
                v
            })
            .collect();
        (200, json!(nodes))
    }

    fn attach(&mut self, addr: String, req: tiny_http::Request) {
        let (cache, errors) = (self.cache.clone(), self.detach_errors.clone());
        let worker = std::thread::Builder::new()
            .name("api-attach".into())
            .spawn(move || {
                let (code, body) = match cache.attach_node(&addr) {
                    Ok(()) => {
                        errors.lock().unwrap().remove(&addr);
                        (200, json!({"addr": addr, "state": "active"}))
                    }
                    Err(e) => placement_error(&e),
                };
                respond(req, code, &body);
            });
        match worker {
            Ok(t) => self.workers.push(t),
            Err(e) => log::error!("cannot start a thread to attach a memory node: {e}"),
        }
    }

    fn detach(&self, addr: &str) -> (u16, serde_json::Value) {
        let errors = self.detach_errors.clone();
        let key = addr.to_string();
        errors.lock().unwrap().remove(addr);
        match self.cache.detach_node(addr, move |r| {
            if let Err(e) = r {
                let why = fabric::client::error_chain(&e);
                errors.lock().unwrap().insert(key, why);
            }
        }) {
            Ok(()) => (202, json!({"addr": addr, "state": "draining"})),
            Err(e) => placement_error(&e),
        }
    }

    fn reap_workers(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.workers.drain(..).partition(|t| t.is_finished());
        self.workers = running;
        for t in done {
            let _ = t.join();
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}

fn placement_error(e: &PlacementError) -> (u16, serde_json::Value) {
    let code = match e {
        PlacementError::Connect { .. } => 400,
        PlacementError::Unknown(_) => 404,
        _ => 409,
    };
    error(code, &fabric::client::error_chain(e))
}

impl MutEventSubscriber for Handler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        self.reap_workers();
        while let Ok((action, req)) = self.rx.try_recv() {
            self.serve(action, req);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("the API's control loop cannot watch its eventfd: {e}");
        }
    }
}

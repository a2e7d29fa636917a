//! The node's RDMA side (cargo feature `rdma`, `memnode --rdma DEV`): one
//! protection domain per VM, the VM's region chunks registered in it for
//! remote reads, and one queue pair per VMM connection in the same domain.
//!
//! A queue pair can only reach memory registered in its own protection
//! domain, so a VMM's queue pair can read its own VM's pages and no other
//! VM's, whatever remote key it tries. Queue pairs are set up over the
//! authenticated TCP connection (`RdmaConnect`), for a VM the connection
//! proved it acts for.

use crate::regions::{RegisterError, Registrar, Registration};
use fabric::proto::RdmaEndpoint;
use fabric::transport::rdma::RdmaError;
use fabric::transport::rdma::verbs::{Cq, Device, Mr, Pd, Qp, QpCaps};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The node's RDMA device and its per-VM protection domains.
pub struct RdmaNode {
    device: Arc<Device>,
    cq: Arc<Cq>,
    pds: Mutex<HashMap<u64, Arc<Pd>>>,
}

impl RdmaNode {
    /// Opens device `name` (`auto`: the first with an active port).
    pub fn open(name: &str) -> Result<Arc<Self>, RdmaError> {
        let device = Device::open((name != "auto").then_some(name))?;
        // The node posts no work requests: its queue pairs only answer
        // READs, which complete nothing here.
        let cq = Cq::new(&device, 16)?;
        log::info!("RDMA on {}: one-sided reads of VM regions", device.name());
        Ok(Arc::new(RdmaNode {
            device,
            cq,
            pds: Mutex::new(HashMap::new()),
        }))
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        self.device.name()
    }

    fn pd(&self, vm: u64) -> Result<Arc<Pd>, RdmaError> {
        let mut pds = self.pds.lock().unwrap();
        if let Some(pd) = pds.get(&vm) {
            return Ok(pd.clone());
        }
        let pd = Pd::new(&self.device)?;
        pds.insert(vm, pd.clone());
        Ok(pd)
    }

    /// A queue pair for a connection of `vm`, connected to the client's
    /// `peer`, allowing remote reads; returns it with this side's endpoint.
    pub fn accept(&self, vm: u64, peer: &RdmaEndpoint) -> Result<(Qp, RdmaEndpoint), RdmaError> {
        let pd = self.pd(vm)?;
        let qp = Qp::new(
            &pd,
            &self.cq,
            QpCaps {
                send_wr: 1,
                rd_atomic: 16,
            },
            true,
        )?;
        // The responder retries nothing itself; the client times out.
        qp.connect(peer, 14, 7)?;
        let endpoint = qp.endpoint();
        Ok((qp, endpoint))
    }
}

impl Registrar for Arc<RdmaNode> {
    unsafe fn register(
        &self,
        vm: u64,
        mem: *mut u8,
        len: usize,
    ) -> Result<Registration, RegisterError> {
        let pd = self.pd(vm)?;
        // SAFETY: our caller keeps the chunk mapped until the registration
        // (holding this MR) is dropped (this function's contract).
        let mr = unsafe { Mr::register(&pd, mem, len, true) }?;
        Ok(Registration {
            rkey: mr.rkey(),
            handle: Box::new(mr),
        })
    }

    fn forget(&self, vm: u64) {
        // The domain goes when its last queue pair and registration do.
        self.pds.lock().unwrap().remove(&vm);
    }
}

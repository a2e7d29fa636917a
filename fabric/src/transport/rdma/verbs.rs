//! Owned handles over the verbs of libibverbs (through `ibverbs-sys`, the
//! `ibverbs` crate's ffi layer): a device context, protection domains,
//! completion queues with their completion channel, reliable-connected queue
//! pairs, and memory registrations.
//!
//! Each handle owns its verbs object and holds an `Arc` of what it was made
//! from (a queue pair keeps its domain and completion queue alive, a domain
//! its context), so no object is destroyed before the objects that use it,
//! whatever order the owners drop them in.

use super::RdmaError;
use ibverbs_sys as ffi;
use std::ffi::CStr;
use std::io;
use std::os::raw::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// The port every device is used through (rxe devices have one).
const PORT: u8 = 1;

fn verb(verb: &'static str, errno: i32) -> RdmaError {
    RdmaError::Verb {
        verb,
        source: io::Error::from_raw_os_error(errno),
    }
}

fn last(verb: &'static str) -> RdmaError {
    RdmaError::Verb {
        verb,
        source: io::Error::last_os_error(),
    }
}

/// An open RDMA device and the address (GID) its port is used with.
pub struct Device {
    ctx: *mut ffi::ibv_context,
    name: String,
    gid: [u8; 16],
    gid_index: u8,
    lid: u16,
    active_mtu: ffi::ibv_mtu,
}

// SAFETY: an ibv_context may be used from any thread (libibverbs serialises
// what needs it); the other fields are plain data.
unsafe impl Send for Device {}
// SAFETY: as above; `&Device` only reads plain data or calls thread-safe verbs.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device named `name`, or the first one with an active port.
    pub fn open(name: Option<&str>) -> Result<Arc<Self>, RdmaError> {
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed below.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(last("ibv_get_device_list"));
        }
        let mut seen = Vec::new();
        let mut found = None;
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a listed device; the name is a NUL-terminated
            // string owned by the list.
            let dev_name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if name.is_some_and(|w| w != dev_name) {
                seen.push(dev_name);
                continue;
            }
            match Self::open_one(dev, dev_name.clone()) {
                Ok(d) => {
                    found = Some(Ok(d));
                    break;
                }
                Err(e) if name.is_some() => {
                    found = Some(Err(e));
                    break;
                }
                Err(e) => seen.push(format!("{dev_name} ({e})")),
            }
        }
        // SAFETY: the list came from ibv_get_device_list and is freed once;
        // an opened context does not refer to it.
        unsafe { ffi::ibv_free_device_list(list) };
        found.unwrap_or_else(|| {
            Err(RdmaError::NoDevice {
                wanted: name.map(str::to_string),
                seen: if seen.is_empty() {
                    "none (is an RDMA driver loaded, e.g. `modprobe rdma_rxe` and `rdma link add`?)"
                        .into()
                } else {
                    seen.join(", ")
                },
            })
        })
    }

    fn open_one(dev: *mut ffi::ibv_device, name: String) -> Result<Arc<Self>, RdmaError> {
        // SAFETY: `dev` is a listed device.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(last("ibv_open_device"));
        }
        let mut device = Device {
            ctx,
            name,
            gid: [0; 16],
            gid_index: 0,
            lid: 0,
            active_mtu: ffi::IBV_MTU_1024,
        };
        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: `ctx` is open; `attr` is a valid out-pointer of the right type.
        let e = unsafe { ffi::ibv_query_port(ctx, PORT, &mut attr as *mut _ as *mut _) };
        if e != 0 {
            return Err(verb("ibv_query_port", e));
        }
        if attr.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortDown {
                device: device.name.clone(),
                state: attr.state,
            });
        }
        device.lid = attr.lid;
        device.active_mtu = attr.active_mtu;
        // The GID: on RoCE a version 2 one (routable over UDP/IP; mlx5 lists a
        // version 1 entry for each address too), IPv4-mapped if there is one;
        // on InfiniBand the first.
        let mut best: Option<(u8, [u8; 16], u32)> = None;
        for index in 0..attr.gid_tbl_len.clamp(0, 256) as u32 {
            let mut entry = ffi::ibv_gid_entry::default();
            // SAFETY: `ctx` is open; `entry` is a valid out-pointer of the size given.
            let e = unsafe {
                ffi::_ibv_query_gid_ex(
                    ctx,
                    u32::from(PORT),
                    index,
                    &mut entry,
                    0,
                    std::mem::size_of::<ffi::ibv_gid_entry>(),
                )
            };
            if e != 0 {
                continue;
            }
            // SAFETY: every bit pattern of the union is a valid byte array.
            let raw = unsafe { entry.gid.raw };
            if raw == [0; 16] {
                continue;
            }
            let v4 = raw[..10] == [0; 10] && raw[10..12] == [0xff, 0xff];
            let rank = match entry.gid_type {
                ffi::IBV_GID_TYPE_ROCE_V2 if v4 => 3,
                ffi::IBV_GID_TYPE_ROCE_V2 => 2,
                ffi::IBV_GID_TYPE_IB => 2,
                _ => 1,
            };
            if best.is_none_or(|b| rank > b.2) {
                best = Some((index as u8, raw, rank));
            }
        }
        let best = best.map(|(i, g, _)| (i, g));
        let Some((index, gid)) = best else {
            return Err(RdmaError::NoGid {
                device: device.name.clone(),
            });
        };
        device.gid = gid;
        device.gid_index = index;
        Ok(Arc::new(device))
    }

    /// The device's name, e.g. `rxe0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID the port is used with.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    /// The port's LID (0 on RoCE).
    pub fn lid(&self) -> u16 {
        self.lid
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: opened in `open_one`; every object made from it holds an
        // `Arc<Device>`, so none is left.
        unsafe { ffi::ibv_close_device(self.ctx) };
    }
}

/// A protection domain: queue pairs reach only the memory registered in
/// their own domain.
pub struct Pd {
    device: Arc<Device>,
    pd: *mut ffi::ibv_pd,
}

// SAFETY: a PD is an opaque kernel object handle, usable from any thread.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    /// A new protection domain on `device`.
    pub fn new(device: &Arc<Device>) -> Result<Arc<Self>, RdmaError> {
        // SAFETY: the context is open while `device` lives.
        let pd = unsafe { ffi::ibv_alloc_pd(device.ctx) };
        if pd.is_null() {
            return Err(last("ibv_alloc_pd"));
        }
        Ok(Arc::new(Pd {
            device: device.clone(),
            pd,
        }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every QP and MR of the domain holds an `Arc<Pd>`: none is left.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

/// A memory registration: `len` bytes at `addr`, pinned while it lives.
pub struct Mr {
    _pd: Arc<Pd>,
    mr: *mut ffi::ibv_mr,
}

// SAFETY: an MR handle is usable from any thread; its memory is the owner's.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `len` bytes at `addr` in `pd`: for RDMA READs by peers of the
    /// domain (`remote_read`), and for the device to write into (local
    /// write, which also makes the kernel pin writable pages).
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must be memory of this process that stays mapped
    /// until the returned `Mr` is dropped.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        remote_read: bool,
    ) -> Result<Self, RdmaError> {
        let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_read {
            access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        }
        // SAFETY: the caller keeps the range mapped while the MR lives; the
        // PD is alive (we hold it).
        let mr = unsafe { ffi::ibv_reg_mr(pd.pd, addr as *mut c_void, len, access.0 as i32) };
        if mr.is_null() {
            return Err(last("ibv_reg_mr"));
        }
        Ok(Mr {
            _pd: pd.clone(),
            mr,
        })
    }

    /// The key peers use to read it.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).rkey }
    }

    /// The key the local device uses for it.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).lkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once; the memory is
        // still mapped (the caller's contract).
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

/// A completion queue with its own completion channel, so a waiter can
/// block (with a timeout) instead of spinning.
pub struct Cq {
    /// Kept alive: the queue and its channel belong to the device's context.
    _device: Arc<Device>,
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
}

// SAFETY: polling and arming a CQ are thread-safe in libibverbs; one thread
// polls at a time by the owner's design.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

/// One completion: the work request's id and, if it failed, why.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The id the work request was posted with.
    pub wr_id: u64,
    /// `None` on success; else the status and its name.
    pub error: Option<(u32, &'static str)>,
}

impl Cq {
    /// A completion queue of at least `entries` entries.
    pub fn new(device: &Arc<Device>, entries: i32) -> Result<Arc<Self>, RdmaError> {
        // SAFETY: the context is open while `device` lives.
        let channel = unsafe { ffi::ibv_create_comp_channel(device.ctx) };
        if channel.is_null() {
            return Err(last("ibv_create_comp_channel"));
        }
        // Non-blocking: `wait` polls the fd with a timeout.
        // SAFETY: `channel` is live; its fd is a valid descriptor.
        let fd = unsafe { (*channel).fd };
        // SAFETY: F_GETFL/F_SETFL on a valid fd.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        // SAFETY: the context is open; `channel` belongs to it.
        let cq = unsafe { ffi::ibv_create_cq(device.ctx, entries, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = last("ibv_create_cq");
            // SAFETY: created above, no CQ uses it.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        let cq = Cq {
            _device: device.clone(),
            channel,
            cq,
        };
        cq.arm()?;
        Ok(Arc::new(cq))
    }

    fn arm(&self) -> Result<(), RdmaError> {
        // SAFETY: `cq` is live; req_notify_cq is the provider's function for it.
        let e = unsafe {
            let ops = &mut (*(*self.cq).context).ops;
            ops.req_notify_cq
                .expect("providers implement req_notify_cq")(self.cq, 0)
        };
        if e != 0 {
            return Err(verb("ibv_req_notify_cq", e));
        }
        Ok(())
    }

    /// Takes the completions that are there, up to `max`, without blocking.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<(), RdmaError> {
        // SAFETY: ibv_wc is plain old data; all zeros is a valid value.
        let mut wc: [ffi::ibv_wc; 32] = unsafe { std::mem::zeroed() };
        while out.len() < max {
            let want = (max - out.len()).min(wc.len()) as i32;
            // SAFETY: `cq` is live; `wc` has room for `want` entries.
            let n = unsafe {
                let ops = &mut (*(*self.cq).context).ops;
                ops.poll_cq.expect("providers implement poll_cq")(self.cq, want, wc.as_mut_ptr())
            };
            if n < 0 {
                return Err(verb("ibv_poll_cq", -n));
            }
            for c in &wc[..n as usize] {
                out.push(Completion {
                    wr_id: c.wr_id(),
                    error: c.error().map(|(status, _)| {
                        // SAFETY: ibv_wc_status_str returns a static string.
                        let name = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
                        (status, name.to_str().unwrap_or("unknown status"))
                    }),
                });
            }
            if (n as usize) < want as usize {
                break;
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the completion channel to signal (then
    /// re-arms it); the caller polls afterwards either way.
    pub fn wait(&self, timeout: Duration) -> Result<(), RdmaError> {
        // SAFETY: `channel` is live.
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(RdmaError::Verb {
                verb: "poll(completion channel)",
                source: e,
            });
        }
        if r == 0 {
            return Ok(());
        }
        let mut cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: the channel is live and readable; out-pointers are valid.
        if unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } == 0 {
            // SAFETY: one event of this CQ was taken.
            unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        }
        self.arm()
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP using the CQ holds an `Arc<Cq>`: none is left; the
        // channel outlives the CQ, as libibverbs requires.
        unsafe {
            ffi::ibv_destroy_cq(self.cq);
            ffi::ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// Limits of a queue pair.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    /// Most send work requests outstanding.
    pub send_wr: u32,
    /// Most RDMA READs this side has outstanding to the peer (initiator depth)
    /// and accepts from it (responder resources).
    pub rd_atomic: u8,
}

/// One RDMA READ: `len` bytes at the peer's `remote` into `local`.
#[derive(Debug, Clone, Copy)]
pub struct ReadWr {
    /// The id its completion carries.
    pub wr_id: u64,
    /// Where the bytes go (in a local registration).
    pub local: *mut u8,
    /// How many bytes.
    pub len: u32,
    /// Where they come from (in the peer's registration).
    pub remote: u64,
}

/// A reliable-connected queue pair.
pub struct Qp {
    pd: Arc<Pd>,
    _cq: Arc<Cq>,
    qp: *mut ffi::ibv_qp,
    psn: u32,
    caps: QpCaps,
}

// SAFETY: posting to a QP is thread-safe in libibverbs (the provider locks
// its queue); the owner serialises posts anyway.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

/// The state a queue pair is moved to, for `ibv_modify_qp`.
fn modify(
    qp: *mut ffi::ibv_qp,
    attr: &mut ffi::ibv_qp_attr,
    mask: ffi::ibv_qp_attr_mask,
) -> Result<(), RdmaError> {
    // SAFETY: `qp` is live; `attr` is valid for the fields `mask` names.
    let e = unsafe { ffi::ibv_modify_qp(qp, attr, mask.0 as i32) };
    if e != 0 {
        return Err(verb("ibv_modify_qp", e));
    }
    Ok(())
}

impl Qp {
    /// A reliable-connected queue pair in `pd`, completing into `cq`, in the
    /// INIT state with remote reads allowed (`remote_read`) or not.
    pub fn new(
        pd: &Arc<Pd>,
        cq: &Arc<Cq>,
        caps: QpCaps,
        remote_read: bool,
    ) -> Result<Self, RdmaError> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq.cq,
            recv_cq: cq.cq,
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: caps.send_wr.max(1),
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and CQ are live (held below); `init` is valid.
        let qp = unsafe { ffi::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(last("ibv_create_qp"));
        }
        let psn =
            u32::from_le_bytes(crate::auth::random::<4>().unwrap_or([1, 2, 3, 4])) & 0xff_ffff;
        let me = Qp {
            pd: pd.clone(),
            _cq: cq.clone(),
            qp,
            psn,
            caps,
        };
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT,
            qp_access_flags: if remote_read {
                ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            } else {
                0
            },
            ..Default::default()
        };
        modify(
            qp,
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE
                | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ffi::ibv_qp_attr_mask::IBV_QP_PORT
                | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
        )?;
        Ok(me)
    }

    /// This side's endpoint, for the peer.
    pub fn endpoint(&self) -> crate::proto::RdmaEndpoint {
        let d = self.pd.device();
        crate::proto::RdmaEndpoint {
            // SAFETY: `qp` is live.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            lid: d.lid,
            gid: d.gid,
        }
    }

    /// Connects to the peer's queue pair: INIT -> RTR -> RTS. `timeout_exp`
    /// is the transport's ACK timeout, 4.096 µs × 2^exp per try, and
    /// `retries` how often a lost packet is resent before the queue pair
    /// fails (the completions then carry the error).
    pub fn connect(
        &self,
        peer: &crate::proto::RdmaEndpoint,
        timeout_exp: u8,
        retries: u8,
    ) -> Result<(), RdmaError> {
        let d = self.pd.device();
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: d.active_mtu,
            dest_qp_num: peer.qpn,
            rq_psn: peer.psn,
            max_dest_rd_atomic: self.caps.rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: peer.lid,
                sl: 0,
                src_path_bits: 0,
                port_num: PORT,
                is_global: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        attr.ah_attr.grh.dgid.raw = peer.gid;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.grh.sgid_index = d.gid_index;
        use ffi::ibv_qp_attr_mask as M;
        modify(
            self.qp,
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
        )?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: timeout_exp,
            retry_cnt: retries.min(7),
            rnr_retry: 7,
            max_rd_atomic: self.caps.rd_atomic,
            ..Default::default()
        };
        modify(
            self.qp,
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Posts a chain of signalled RDMA READs, each reading `len` bytes of
    /// the peer's `rkey` memory at `remote` into `local` under `lkey`.
    ///
    /// # Safety
    ///
    /// Each local range must lie in the registration `lkey` names and stay
    /// untouched by anyone else until its completion has been polled.
    pub unsafe fn post_reads(
        &self,
        reads: &[ReadWr],
        lkey: u32,
        rkey: u32,
    ) -> Result<(), RdmaError> {
        if reads.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ffi::ibv_sge> = reads
            .iter()
            .map(|r| ffi::ibv_sge {
                addr: r.local as u64,
                length: r.len,
                lkey,
            })
            .collect();
        let mut wrs: Vec<ffi::ibv_send_wr> = Vec::with_capacity(reads.len());
        for (k, r) in reads.iter().enumerate() {
            let mut wr = ffi::ibv_send_wr {
                wr_id: r.wr_id,
                next: ptr::null_mut(),
                sg_list: &mut sges[k],
                num_sge: 1,
                opcode: ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
                __bindgen_anon_1: Default::default(),
                wr: Default::default(),
                qp_type: Default::default(),
                __bindgen_anon_2: Default::default(),
            };
            wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: r.remote,
                rkey,
            };
            wrs.push(wr);
        }
        let base = wrs.as_mut_ptr();
        for k in 0..wrs.len() - 1 {
            // SAFETY: `k + 1` is in bounds; the chain points into `wrs`, which
            // is not moved until the post returns.
            wrs[k].next = unsafe { base.add(k + 1) };
        }
        let mut bad = ptr::null_mut();
        // SAFETY: `qp` is live; the chain and its SGEs are valid for the call
        // (the provider copies them); the local memory is the caller's contract.
        let e = unsafe {
            let ops = &mut (*(*self.qp).context).ops;
            ops.post_send.expect("providers implement post_send")(self.qp, base, &mut bad)
        };
        if e != 0 {
            return Err(verb("ibv_post_send", e));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; the PD and CQ outlive it
        // (held by this struct).
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

/// Anonymous memory of this process, zero-filled, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the owner decides who writes it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of private anonymous memory.
    pub fn new(len: usize) -> Result<Self, RdmaError> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last("mmap"));
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Its address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: mappings have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut c_void, self.len) };
    }
}

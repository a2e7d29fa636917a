//! Volumes: sparse files in one directory, each served as the NBD export of the
//! same name.
//!
//! [`VolumeDir`] owns the directory: it validates names, creates volumes, lists
//! them for `NBD_OPT_LIST`, and opens each at most once (every connection to an
//! export shares one [`Volume`] and its file descriptor, so `FLUSH` on any
//! connection covers writes made on all of them). [`Volume`] does the I/O with
//! positional system calls, safe to call from many threads at once:
//!
//! | operation | system calls |
//! |---|---|
//! | read | `pread`; `preadv2(RWF_NOWAIT)` first on the fast path (page-cache hits only) |
//! | write | `pwrite` |
//! | write with FUA | `pwritev2(RWF_DSYNC)` (`pwrite` + `fdatasync` where unsupported) |
//! | flush | `fdatasync` |
//! | trim | `fallocate(PUNCH_HOLE \| KEEP_SIZE)`, then `fdatasync` with FUA |
//! | write zeroes | `fallocate(PUNCH_HOLE \| KEEP_SIZE)`, or `fallocate(ZERO_RANGE \| KEEP_SIZE)` with `NO_HOLE`, else `pwrite` of zeros; then `fdatasync` with FUA |

use nbd_proto::wire::TransmissionFlags;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// The longest volume name: one file name component.
pub const MAX_NAME_LEN: usize = 255;
/// Volume sizes must be a multiple of this (the sector size a block device shows).
pub const SIZE_ALIGN: u64 = 512;
/// The lock file that keeps two nodes off one directory (not a valid volume name).
pub const LOCK_FILE: &str = ".storagenode.lock";

/// Why a name cannot be a volume's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("empty")]
    Empty,
    /// The name is longer than a file name may be.
    #[error("{0} bytes long, more than {MAX_NAME_LEN}")]
    TooLong(usize),
    /// The name contains `/`.
    #[error("contains '/'")]
    Slash,
    /// The name contains `..`.
    #[error("contains '..'")]
    DotDot,
    /// The name starts with `.` (hidden files, such as the lock file, are not volumes).
    #[error("starts with '.'")]
    LeadingDot,
    /// The name contains a control character (including NUL).
    #[error("contains a control character")]
    Control,
}

/// Checks that `name` can name a volume: non-empty, at most 255 bytes, no `/`,
/// no `..`, no leading `.`, no control characters.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    if name.contains("..") {
        return Err(NameError::DotDot);
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(())
}

/// Volume and volume-directory failures.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The name is not a valid volume name.
    #[error("invalid volume name {name:?}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: NameError,
    },
    /// No volume has this name.
    #[error("no volume named {0:?}")]
    NotFound(String),
    /// The name exists but is not a regular file (a directory, a symbolic link...).
    #[error("{0:?} is not a regular file")]
    NotRegular(String),
    /// `--create` asked for a size other than the existing volume's.
    #[error("volume {name:?} exists with {existing} bytes, not the {requested} asked for")]
    SizeMismatch {
        /// The volume.
        name: String,
        /// Its size.
        existing: u64,
        /// The size asked for.
        requested: u64,
    },
    /// A volume size that is zero or not a multiple of 512.
    #[error("volume size {0} is not a positive multiple of {SIZE_ALIGN} bytes")]
    BadSize(u64),
    /// The directory cannot be created or opened.
    #[error("cannot use volume directory {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another storage node holds the directory's lock.
    #[error("volume directory {} is in use by another storagenode", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// A volume cannot be opened.
    #[error("cannot open volume {name:?}")]
    Open {
        /// The volume.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A volume cannot be created.
    #[error("cannot create volume {name:?}")]
    Create {
        /// The volume.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What [`VolumeDir::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new sparse file was made.
    New,
    /// A volume of that size already existed and was kept.
    Kept,
}

/// The directory of volumes a storage node serves.
pub struct VolumeDir {
    path: PathBuf,
    dir: File,
    /// Held (with `flock`) for the node's lifetime.
    _lock: File,
    read_only: HashSet<String>,
    open: Mutex<HashMap<String, Arc<Volume>>>,
}

impl VolumeDir {
    /// Opens (creating it if missing) and locks the directory; `read_only` names the
    /// volumes to serve read-only.
    pub fn open(path: &Path, read_only: &[String]) -> Result<Self, VolumeError> {
        let dir_err = |source| VolumeError::Dir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(dir_err)?;
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(dir_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path.join(LOCK_FILE))
            .map_err(dir_err)?;
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(VolumeError::Locked {
                    path: path.to_path_buf(),
                });
            }
            return Err(dir_err(e));
        }
        for name in read_only {
            validate_name(name).map_err(|source| VolumeError::InvalidName {
                name: name.clone(),
                source,
            })?;
        }
        Ok(VolumeDir {
            path: path.to_path_buf(),
            dir,
            _lock: lock,
            read_only: read_only.iter().cloned().collect(),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates volume `name` as a sparse file of `size` bytes, durably (the file and
    /// the directory entry are synced), or keeps an existing one of the same size.
    pub fn create(&self, name: &str, size: u64) -> Result<Created, VolumeError> {
        validate_name(name).map_err(|source| VolumeError::InvalidName {
            name: name.into(),
            source,
        })?;
        if size == 0 || size % SIZE_ALIGN != 0 {
            return Err(VolumeError::BadSize(size));
        }
        let create_err = |source| VolumeError::Create {
            name: name.into(),
            source,
        };
        let path = self.path.join(name);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                let made = f
                    .set_len(size)
                    .and_then(|()| f.sync_all())
                    .and_then(|()| self.dir.sync_all());
                if let Err(e) = made {
                    let _ = std::fs::remove_file(&path);
                    return Err(create_err(e));
                }
                Ok(Created::New)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(&path).map_err(create_err)?;
                if !meta.file_type().is_file() {
                    return Err(VolumeError::NotRegular(name.into()));
                }
                if meta.len() != size {
                    return Err(VolumeError::SizeMismatch {
                        name: name.into(),
                        existing: meta.len(),
                        requested: size,
                    });
                }
                Ok(Created::Kept)
            }
            Err(e) => Err(create_err(e)),
        }
    }

    /// The volume `name`, opened on first use and shared afterwards.
    pub fn lookup(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        validate_name(name).map_err(|source| VolumeError::InvalidName {
            name: name.into(),
            source,
        })?;
        let mut open = self.open.lock().unwrap();
        if let Some(v) = open.get(name) {
            return Ok(v.clone());
        }
        let read_only = self.read_only.contains(name);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path.join(name))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => VolumeError::NotFound(name.into()),
                Some(libc::ELOOP | libc::EISDIR) => VolumeError::NotRegular(name.into()),
                _ => VolumeError::Open {
                    name: name.into(),
                    source: e,
                },
            })?;
        let meta = file.metadata().map_err(|source| VolumeError::Open {
            name: name.into(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(VolumeError::NotRegular(name.into()));
        }
        let v = Arc::new(Volume {
            name: name.into(),
            file,
            size: meta.len(),
            read_only,
            nowait_reads: AtomicBool::new(true),
            rwf_dsync: AtomicBool::new(true),
        });
        open.insert(name.into(), v.clone());
        Ok(v)
    }

    /// The names of every volume (regular files with valid names), sorted.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if validate_name(&name).is_ok() && entry.file_type()?.is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// `fdatasync`s every writable volume opened so far (at shutdown).
    pub fn sync_all(&self) -> usize {
        let open: Vec<_> = self.open.lock().unwrap().values().cloned().collect();
        let mut synced = 0;
        for v in open.iter().filter(|v| !v.read_only) {
            match v.flush() {
                Ok(()) => synced += 1,
                Err(e) => log::error!("volume {:?}: fdatasync failed: {e}", v.name),
            }
        }
        synced
    }
}

/// One open volume: a sparse file of fixed size.
pub struct Volume {
    name: String,
    file: File,
    size: u64,
    read_only: bool,
    /// `preadv2(RWF_NOWAIT)` works on this file system.
    nowait_reads: AtomicBool,
    /// `pwritev2(RWF_DSYNC)` works on this file system.
    rwf_dsync: AtomicBool,
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

impl Volume {
    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The transmission flags to advertise: flush, FUA and multi-connection always
    /// (all connections share this file); trim and write-zeroes when writable.
    pub fn flags(&self) -> TransmissionFlags {
        let mut f = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::CAN_MULTI_CONN;
        if self.read_only {
            f |= TransmissionFlags::READ_ONLY;
        } else {
            f |= TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        }
        TransmissionFlags(f)
    }

    /// Whether `offset..offset + len` lies within the volume.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Reads `buf.len()` bytes at `offset` (`pread`); bytes past the end of the
    /// file (if it was shortened behind our back) read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads `buf` at `offset` only if every byte is in the page cache
    /// (`preadv2(RWF_NOWAIT)`), without blocking on the disk. `false`: not cached
    /// (or not supported here); use [`Volume::read_at`] from a thread that may block.
    pub fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if !self.nowait_reads.load(Relaxed) {
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, which is valid for writes of its
        // length and exclusively borrowed for the call; the fd is open.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if unsupported(&e) {
                log::debug!(
                    "volume {:?}: preadv2(RWF_NOWAIT) unsupported: {e}",
                    self.name
                );
                self.nowait_reads.store(false, Relaxed);
            }
            return false;
        }
        n as usize == buf.len()
    }

    /// Writes `data` at `offset`. With `fua`, returns only once the data is durable:
    /// `pwritev2(RWF_DSYNC)`, or `pwrite` then `fdatasync` where that is unsupported.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if fua && self.rwf_dsync.load(Relaxed) {
            match self.pwrite_dsync(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {
                    log::debug!(
                        "volume {:?}: pwritev2(RWF_DSYNC) unsupported: {e}",
                        self.name
                    );
                    self.rwf_dsync.store(false, Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn pwrite_dsync(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec describing `rest`, valid for reads of its length for
            // the call (pwritev2 does not write through it); the fd is open.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Makes every completed write durable: `fdatasync`.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: fallocate(2) on our open fd; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Discards a range: punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); a
    /// file system that cannot is ignored (trim is a hint). With `fua`, `fdatasync`.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Zeroes a range so that it reads back as zeros: punches a hole, unless
    /// `no_hole` asks for the range to stay allocated, in which case
    /// `fallocate(ZERO_RANGE | KEEP_SIZE)`; where the file system supports neither,
    /// writes zeros. With `fua`, `fdatasync`.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> io::Result<()> {
        let mut done = false;
        if !no_hole {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => done = true,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => done = true,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "storagenode-unit-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn names() {
        assert!(validate_name("disk0").is_ok());
        assert!(validate_name("vm-1_root.img").is_ok());
        assert!(validate_name("a.b").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("a/b"), Err(NameError::Slash));
        assert_eq!(validate_name(".."), Err(NameError::DotDot));
        assert_eq!(validate_name("a..b"), Err(NameError::DotDot));
        assert_eq!(validate_name(".hidden"), Err(NameError::LeadingDot));
        assert_eq!(validate_name(LOCK_FILE), Err(NameError::LeadingDot));
        assert_eq!(validate_name("a\0b"), Err(NameError::Control));
        assert_eq!(validate_name("a\nb"), Err(NameError::Control));
        assert_eq!(
            validate_name(&"x".repeat(256)),
            Err(NameError::TooLong(256))
        );
        assert!(validate_name(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn create_keep_mismatch_lock_and_io() {
        let path = tempdir("create");
        let dir = VolumeDir::open(&path, &["ro".to_string()]).unwrap();
        assert!(matches!(
            VolumeDir::open(&path, &[]),
            Err(VolumeError::Locked { .. })
        ));
        assert_eq!(dir.create("a", 1 << 20).unwrap(), Created::New);
        assert_eq!(dir.create("a", 1 << 20).unwrap(), Created::Kept);
        assert!(matches!(
            dir.create("a", 2 << 20),
            Err(VolumeError::SizeMismatch {
                existing: 1048576,
                ..
            })
        ));
        assert!(matches!(
            dir.create("b", 1000),
            Err(VolumeError::BadSize(1000))
        ));
        assert!(matches!(dir.create("b", 0), Err(VolumeError::BadSize(0))));
        assert!(matches!(
            dir.create("../b", 512),
            Err(VolumeError::InvalidName { .. })
        ));
        // Sparse: no blocks allocated.
        let meta = std::fs::metadata(path.join("a")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::blocks(&meta), 0);
        dir.create("ro", 4096).unwrap();
        std::fs::create_dir(path.join("subdir")).unwrap();
        assert_eq!(dir.list().unwrap(), vec!["a", "ro"]);
        assert!(matches!(dir.lookup("nope"), Err(VolumeError::NotFound(_))));
        assert!(matches!(
            dir.lookup("subdir"),
            Err(VolumeError::NotRegular(_))
        ));

        let v = dir.lookup("a").unwrap();
        assert!(Arc::ptr_eq(&v, &dir.lookup("a").unwrap()));
        assert_eq!(v.size(), 1 << 20);
        assert!(!v.flags().has(TransmissionFlags::READ_ONLY));
        assert!(v.in_range(0, 1 << 20));
        assert!(!v.in_range(1, 1 << 20));
        assert!(!v.in_range(u64::MAX, 2));
        v.write_at(&[7u8; 8192], 4096, false).unwrap();
        v.write_at(&[9u8; 4096], 65536, true).unwrap();
        v.flush().unwrap();
        let mut b = vec![0u8; 8192];
        v.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let mut c = vec![0u8; 4096];
        assert!(v.try_read_cached(&mut c, 65536));
        assert!(c.iter().all(|&x| x == 9));
        v.write_zeroes(4096, 4096, false, false).unwrap();
        v.write_zeroes(8192, 4096, true, true).unwrap();
        v.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        v.trim(65536, 4096, true).unwrap();

        let ro = dir.lookup("ro").unwrap();
        assert!(ro.read_only());
        assert!(ro.flags().has(TransmissionFlags::READ_ONLY));
        assert!(!ro.flags().has(TransmissionFlags::SEND_TRIM));
        assert!(ro.write_at(b"x", 0, false).is_err());
        assert_eq!(dir.sync_all(), 1);
        drop(dir);
        // The lock is released with the directory.
        drop(VolumeDir::open(&path, &[]).unwrap());
        std::fs::remove_dir_all(&path).unwrap();
    }
}

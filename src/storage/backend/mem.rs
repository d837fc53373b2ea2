//! An in-memory backend that can crash.
//!
//! Owns: a map of file names to contents, each with the image it had at its
//! last fdatasync. [`MemBackend::crash`] throws away everything not synced,
//! or, with tearing, keeps a random prefix of the unsynced writes in order
//! with the last one cut mid-way and filled with garbage, as a power cut
//! during a multi-block write can. Faults can be injected into writes,
//! syncs and the reads of one file ([`MemBackend::fail_reads_of`]), and the directory can be given a capacity, a disk that fills
//! ([`MemBackend::set_capacity`]). Invariant: `durable` only changes on `sync`, on a write through a
//! handle from `open_synced` when it returns (O_DSYNC: that write alone;
//! until then it is in flight, and a crash may keep or tear it), and on
//! the metadata operations (modelled as durable at once; the engine syncs
//! the directory after them anyway).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use super::{Backend, WriteBuf};
use crate::limits::BLOCK_SIZE;

#[derive(Default, Debug)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order, and synced writes still in
    /// flight: a crash may keep or tear them.
    pending: Vec<(u64, Vec<u8>)>,
    /// A write through a plain handle is among `pending`.
    plain_pending: bool,
    /// Bytes reserved by `preallocate`: the file takes the larger of this
    /// and its length against the capacity.
    allocated: u64,
}

impl MemFile {
    /// What the file takes of the directory's capacity.
    fn footprint(&self) -> u64 {
        (self.data.len() as u64).max(self.allocated)
    }
}

/// Writes `bytes` at `off` into an image (`data` or `durable`), growing it.
fn write_into(image: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let end = off as usize + bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[off as usize..end].copy_from_slice(bytes);
}

#[derive(Default)]
struct MemFs {
    files: BTreeMap<String, Rc<RefCell<MemFile>>>,
    /// Files removed while a handle was open: they take their space until
    /// the last handle goes, as on a real file system (this list holds
    /// one reference of its own).
    removed: Vec<Rc<RefCell<MemFile>>>,
}

/// Shared handle to one in-memory directory; clones see the same files.
#[derive(Clone, Default)]
pub struct MemBackend {
    fs: Rc<RefCell<MemFs>>,
    /// Injected faults: fail every write / sync from now on.
    fail_writes: Rc<Cell<bool>>,
    fail_syncs: Rc<Cell<bool>>,
    /// Writes, preallocations and new files fail as on a full disk.
    no_space: Rc<Cell<bool>>,
    /// Only preallocations fail so (room for data, not a whole segment).
    no_room_to_preallocate: Rc<Cell<bool>>,
    /// Writes wait while set (a slow device, e.g. a seal's fdatasync).
    hold_writes: Rc<Cell<bool>>,
    /// The directory's size, if it has one: what files take beyond it
    /// fails as on a full disk ([`MemBackend::set_capacity`]).
    capacity: Rc<Cell<Option<u64>>>,
    /// Reads of this file fail, as of a bad sector
    /// ([`MemBackend::fail_reads_of`]).
    unreadable: Rc<RefCell<Option<Rc<RefCell<MemFile>>>>>,
}

/// A write buffer.
pub struct MemBuf(Vec<u8>);

impl WriteBuf for MemBuf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// An open in-memory file; `.1`: opened with `open_synced`, so that its
/// writes are durable as they are made.
#[derive(Clone)]
pub struct MemHandle(Rc<RefCell<MemFile>>, bool);

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Makes every read of file `name` fail (a bad sector), or none.
    pub fn fail_reads_of(&self, name: Option<&str>) {
        let file = name.and_then(|n| self.fs.borrow().files.get(n).cloned());
        *self.unreadable.borrow_mut() = file;
    }

    /// Makes every later write fail with an I/O error (or stop failing).
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.set(on);
    }

    /// Makes every later write, preallocation and file creation fail as
    /// on a full disk (`ENOSPC`), or stop failing. Syncs still succeed.
    pub fn no_space(&self, on: bool) {
        self.no_space.set(on);
    }

    /// Makes preallocations alone fail as on a disk with some room left
    /// but not a whole segment's (or stop failing).
    pub fn no_room_to_preallocate(&self, on: bool) {
        self.no_room_to_preallocate.set(on);
    }

    /// Gives the directory a size (`None`: none, the default): a write,
    /// preallocation or fill that would take the files past it fails as
    /// on a full disk, having changed nothing, and
    /// [`Backend::free_space`] reports what is left. A file removed is
    /// freed with its last handle.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.capacity.set(bytes);
    }

    /// Bytes the files take of the capacity: those with a name, and those
    /// removed that a handle still holds open.
    pub fn used(&self) -> u64 {
        let fs = self.fs.borrow();
        let open_removed = fs.removed.iter().filter(|f| Rc::strong_count(f) > 1);
        fs.files.values().chain(open_removed).map(|f| f.borrow().footprint()).sum()
    }

    /// Fails as a full disk does if growing `file` to take `end` bytes
    /// would pass the capacity.
    fn room_for(&self, file: &MemHandle, end: u64) -> io::Result<()> {
        let current = file.0.borrow().footprint();
        self.room(current, end)
    }

    /// Fails as a full disk does if a file that takes `current` bytes
    /// growing to take `end` would pass the capacity.
    fn room(&self, current: u64, end: u64) -> io::Result<()> {
        let Some(capacity) = self.capacity.get() else { return Ok(()) };
        if self.used().saturating_add(end.saturating_sub(current)) > capacity {
            return Err(io::ErrorKind::StorageFull.into());
        }
        Ok(())
    }

    /// Makes every write wait until released (or releases them).
    pub fn hold_writes(&self, on: bool) {
        self.hold_writes.set(on);
    }

    /// Makes every later sync fail with an I/O error (or stop failing).
    pub fn fail_syncs(&self, on: bool) {
        self.fail_syncs.set(on);
    }

    /// Simulates a power cut: every file goes back to its synced image. With
    /// `tear`, a random prefix of each file's unsynced writes survives, the
    /// last of them torn: a prefix of its blocks reached the disk, the rest
    /// kept their old contents. The model assumes what the engine's format
    /// relies on: a device persists each 4 KiB block atomically (old or new,
    /// never a mix) and the blocks of one write in order. Handles opened
    /// before the crash must not be used after it.
    pub fn crash(&self, seed: u64, tear: bool) {
        let mut rng = fastrand::Rng::with_seed(seed);
        // The process that held removed files open is gone.
        self.fs.borrow_mut().removed.clear();
        let fs = self.fs.borrow();
        for file in fs.files.values() {
            let mut f = file.borrow_mut();
            let mut image = f.durable.clone();
            if tear && !f.pending.is_empty() {
                let keep = rng.usize(0..=f.pending.len());
                for (i, (off, bytes)) in f.pending.iter().enumerate().take(keep + 1) {
                    let mut bytes = &bytes[..];
                    if i == keep {
                        let blocks = bytes.len() / BLOCK_SIZE;
                        bytes = &bytes[..rng.usize(0..=blocks) * BLOCK_SIZE];
                    }
                    write_into(&mut image, *off, bytes);
                }
            }
            f.data = image.clone();
            f.durable = image;
            f.pending.clear();
            f.plain_pending = false;
        }
    }

    /// Direct access for tests: flips bits in a file, durably.
    pub fn corrupt(&self, name: &str, off: usize, xor: u8) -> io::Result<()> {
        let fs = self.fs.borrow();
        let file = fs.files.get(name).ok_or_else(|| not_found(name))?;
        let mut f = file.borrow_mut();
        if off >= f.data.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "offset past end"));
        }
        f.data[off] ^= xor;
        if off < f.durable.len() {
            f.durable[off] ^= xor;
        }
        Ok(())
    }

    /// Names and sizes of all files (tests).
    pub fn files(&self) -> Vec<(String, usize)> {
        self.fs.borrow().files.iter().map(|(n, f)| (n.clone(), f.borrow().data.len())).collect()
    }

    /// A write through an `open_synced` handle (O_DSYNC): in flight from
    /// the moment it is issued, so a crash while it is held back may keep
    /// or tear it; durable once it returns `Ok`, and only it, as with a
    /// FUA write (nothing written before it through a plain handle
    /// becomes durable with it; the engine never mixes the two on one
    /// file, and this asserts so). Refused by the gate (an I/O error, no
    /// space), it never reached the device; failed in its flush, it may
    /// or may not survive, until a later write completes over it.
    async fn synced_write(&self, file: &MemHandle, buf: MemBuf, off: u64) -> io::Result<()> {
        {
            let mut f = file.0.borrow_mut();
            assert!(!f.plain_pending, "a synced write to a file with plain writes not yet synced");
            f.pending.push((off, buf.0.clone()));
        }
        let gate = self.write_gate().await.and_then(|()| self.room_for(file, off + buf.0.len() as u64));
        let mut f = file.0.borrow_mut();
        let at = f.pending.iter().rposition(|(o, b)| *o == off && *b == buf.0).expect("the write is in flight");
        if let Err(e) = gate {
            f.pending.remove(at);
            return Err(e);
        }
        write_into(&mut f.data, off, &buf.0);
        if self.fail_syncs.get() {
            return Err(Self::io_error("synced write"));
        }
        // Durable. What was in flight before it is settled as well: a
        // failed write it covers cannot come back over it in a crash.
        f.pending.drain(..=at);
        write_into(&mut f.durable, off, &buf.0);
        Ok(())
    }

    fn open_with(&self, name: &str, create: bool, synced: bool) -> io::Result<MemHandle> {
        let mut fs = self.fs.borrow_mut();
        if let Some(f) = fs.files.get(name) {
            return Ok(MemHandle(f.clone(), synced));
        }
        if !create {
            return Err(not_found(name));
        }
        self.space()?;
        let f = Rc::new(RefCell::new(MemFile::default()));
        fs.files.insert(name.to_string(), f.clone());
        Ok(MemHandle(f, synced))
    }

    fn io_error(what: &str) -> io::Error {
        io::Error::other(format!("injected {what} failure"))
    }

    /// What every write goes through first: it gives way once (a real
    /// write is never done on its first poll), waits while writes are
    /// held back, and fails while writes fail.
    async fn write_gate(&self) -> io::Result<()> {
        futures_lite::future::yield_now().await;
        while self.hold_writes.get() {
            futures_lite::future::yield_now().await;
        }
        if self.fail_writes.get() {
            return Err(Self::io_error("write"));
        }
        self.space()
    }

    /// Fails as a full disk does while `no_space` is set.
    fn space(&self) -> io::Result<()> {
        if self.no_space.get() {
            return Err(io::ErrorKind::StorageFull.into());
        }
        Ok(())
    }
}

impl Backend for MemBackend {
    type File = MemHandle;
    type Buf = MemBuf;
    type Read = Vec<u8>;

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.fs.borrow().files.keys().cloned().collect())
    }

    async fn open(&self, name: &str, create: bool) -> io::Result<MemHandle> {
        self.open_with(name, create, false)
    }

    async fn open_synced(&self, name: &str, create: bool) -> io::Result<MemHandle> {
        self.open_with(name, create, true)
    }

    async fn preallocate(&self, file: &MemHandle, size: u64) -> io::Result<()> {
        if self.no_room_to_preallocate.get() {
            return Err(io::ErrorKind::StorageFull.into());
        }
        self.space()?;
        self.room_for(file, size)?;
        let mut f = file.0.borrow_mut();
        f.allocated = f.allocated.max(size);
        Ok(())
    }

    async fn zero_fill(&self, file: &MemHandle, size: u64) -> io::Result<()> {
        // Files here have no metadata to settle: the fill is zeros up to
        // `size`, durable at once (the real one syncs), and waits and fails
        // like a write.
        self.write_gate().await?;
        self.room_for(file, size)?;
        let mut f = file.0.borrow_mut();
        let size = size as usize;
        if f.data.len() < size {
            f.data.resize(size, 0);
            f.durable.resize(size, 0);
        }
        Ok(())
    }

    fn alloc(&self, _file: &MemHandle, len: usize) -> MemBuf {
        assert_eq!(len % BLOCK_SIZE, 0, "unaligned buffer length {len}");
        MemBuf(vec![0; len])
    }

    fn alloc_with(&self, file: &MemHandle, len: usize, data: &[u8]) -> MemBuf {
        let mut buf = self.alloc(file, len);
        buf.0[..data.len()].copy_from_slice(data);
        buf
    }

    async fn write_at(&self, file: &MemHandle, buf: MemBuf, off: u64) -> io::Result<()> {
        assert_eq!(off % BLOCK_SIZE as u64, 0, "unaligned write offset {off}");
        // Paired with the engine's rule: a write of nothing is not issued
        // (a zero-length DMA buffer can panic glommio's allocator).
        assert!(!buf.0.is_empty(), "a write of no bytes");
        if file.1 {
            return self.synced_write(file, buf, off).await;
        }
        self.write_gate().await?;
        self.room_for(file, off + buf.0.len() as u64)?;
        let mut f = file.0.borrow_mut();
        write_into(&mut f.data, off, &buf.0);
        f.pending.push((off, buf.0));
        f.plain_pending = true;
        Ok(())
    }

    async fn sync(&self, file: &MemHandle) -> io::Result<()> {
        futures_lite::future::yield_now().await;
        if self.fail_syncs.get() {
            return Err(Self::io_error("fdatasync"));
        }
        let mut f = file.0.borrow_mut();
        f.durable = f.data.clone();
        f.pending.clear();
        f.plain_pending = false;
        Ok(())
    }

    async fn read_at(&self, file: &MemHandle, off: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.unreadable.borrow().as_ref().is_some_and(|f| Rc::ptr_eq(f, &file.0)) {
            return Err(Self::io_error("read (bad sector)"));
        }
        let f = file.0.borrow();
        let start = (off as usize).min(f.data.len());
        let end = (off as usize + len).min(f.data.len());
        Ok(f.data[start..end].to_vec())
    }

    async fn size(&self, file: &MemHandle) -> io::Result<u64> {
        Ok(file.0.borrow().data.len() as u64)
    }

    async fn truncate(&self, file: &MemHandle, len: u64) -> io::Result<()> {
        let mut f = file.0.borrow_mut();
        f.data.resize(len as usize, 0);
        f.durable.resize(len as usize, 0);
        // As on a real file system: cutting a file frees its blocks past
        // the cut, preallocated ones included.
        f.allocated = f.allocated.min(len);
        for (off, bytes) in &mut f.pending {
            bytes.truncate((len as usize).saturating_sub(*off as usize));
        }
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        let file = fs.files.remove(name).ok_or_else(|| not_found(name))?;
        fs.removed.retain(|f| Rc::strong_count(f) > 1);
        if Rc::strong_count(&file) > 1 {
            fs.removed.push(file);
        }
        Ok(())
    }

    /// Memory is freed with the last handle, at no cost worth spreading.
    async fn release(&self, file: MemHandle) -> io::Result<()> {
        drop(file);
        self.fs.borrow_mut().removed.retain(|f| Rc::strong_count(f) > 1);
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        let file = fs.files.remove(from).ok_or_else(|| not_found(from))?;
        fs.files.insert(to.to_string(), file);
        Ok(())
    }

    async fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        if self.fail_writes.get() {
            return Err(Self::io_error("write"));
        }
        self.space()?;
        let replaced = self.fs.borrow().files.get(name).map_or(0, |f| f.borrow().footprint());
        self.room(replaced, data.len() as u64)?;
        let f = MemFile { data: data.to_vec(), durable: data.to_vec(), ..Default::default() };
        self.fs.borrow_mut().files.insert(name.to_string(), Rc::new(RefCell::new(f)));
        Ok(())
    }

    async fn read_file(&self, name: &str) -> io::Result<Vec<u8>> {
        let fs = self.fs.borrow();
        let f = fs.files.get(name).ok_or_else(|| not_found(name))?;
        let data = f.borrow().data.clone();
        Ok(data)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }

    async fn yield_now(&self) {
        futures_lite::future::yield_now().await
    }

    /// What the capacity leaves, or `u64::MAX` without one.
    fn free_space(&self) -> io::Result<u64> {
        Ok(self.capacity.get().map_or(u64::MAX, |c| c.saturating_sub(self.used())))
    }
}

//! The real backend: glommio DMA files (O_DIRECT, io_uring) in one directory.
//!
//! Owns: one shard's data directory and its `LOCK` file. Invariants: the
//! directory is locked (flock, exclusive) for as long as the backend lives, so
//! two engines never share it; and the first file this backend opens with
//! O_DIRECT is the non-empty `LOCK` file. glommio 0.9 probes a device for
//! io_uring polling by reading the first DMA file it opens; if that file is
//! empty the probe wrongly succeeds and every later read fails with
//! EOPNOTSUPP (os error 95, glommio issue 605). Reading a full block of
//! `LOCK` first makes the cached answer correct.
//!
//! Every operation on an open file goes through its descriptor, never the
//! path glommio stored when it was opened: files are renamed while open
//! (the spare segment is opened as `spare-segment.tmp` and becomes
//! `seg-N.log`), and glommio does not learn of a rename it did not make.
//! Its reads, writes, fdatasync, fallocate and ftruncate use the
//! descriptor; its `file_size`/`stat` do not (a statx of the stored path),
//! so sizes come from this module's `file_size` (fstat). Its own `rename`,
//! `remove` and `path` are path-based too and are not used.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use super::{write_file_in_pieces, Backend, WriteBuf};
use crate::limits::BLOCK_SIZE;
use crate::notify::Notify;

/// How long [`yield_to_reactor`] sleeps: long enough that the timer
/// cannot have expired by its first poll (nanoseconds later), short
/// against a request's latency. Background work gives way after a budget
/// of work (compaction: 256 records or 256 KiB), so on an otherwise idle
/// shard each budget is followed by one pause (up to ~60 µs with the
/// kernel's timer slack).
const YIELD_PAUSE: std::time::Duration = std::time::Duration::from_micros(10);

/// Gives way to every other task on the shard and to the reactor: returns
/// once the queues with work have run and the executor has polled its
/// rings and timers. Background work (through `Backend::yield_now`) and
/// the node's socket front use it. A short timer is the only way glommio
/// offers:
///
/// - `yield_if_needed` yields only once the executor's preemption timer
///   fires (100 ms by default), and client sockets are not glommio I/O,
///   so nothing shortens it when requests arrive.
/// - A plain `yield_now` re-wakes the task at once: its queue never runs
///   dry, so the executor does not poll its rings (where disk completions
///   and the front's wake-ups arrive) until the preemption timer.
/// - A zero timer never yields at all: glommio's `Timer` is ready on its
///   first poll once its deadline has passed, and a zero deadline has.
///   (That was the yield before; compaction then gave way only at its
///   reads, holding the shard 2-3 ms each time; see perf/RESULTS.md.)
///
/// A deadline `YIELD_PAUSE` away is pending on the first poll; the task
/// then waits until the queues with work (the requests') have run and the
/// reactor has polled for I/O and timers.
pub async fn yield_to_reactor() {
    glommio::timer::sleep(YIELD_PAUSE).await
}

/// How much of a spare segment `zero_fill` writes at a time: 1 MiB, about
/// a millisecond of this disk, between which the shard serves requests.
const ZERO_FILL_PIECE: usize = 1 << 20;

/// How much of a removed file [`GlommioBackend::release`] frees per step.
/// Closing the last descriptor of a removed file frees all its blocks in
/// the closing thread, and glommio closes a dropped file through io_uring
/// inline, on the shard: a 64 MiB segment removed by compaction stalled
/// every request on the shard for 15-20 ms (this disk is mounted with
/// online `discard`, about 0.25 ms a MiB; perf/RESULTS.md, fourteenth
/// session). A truncation runs on glommio's blocking thread instead, but
/// that thread is pinned to the shard's CPU, and it also runs the renames,
/// removals and directory syncs of the write path (a new segment's, a
/// seal's hint): one truncation to zero would take the CPU from the shard
/// and hold those up for as long. 2 MiB is about half a millisecond of it,
/// and requests run between steps.
const RELEASE_PIECE: u64 = 2 << 20;

/// Name of the lock file in every data directory.
pub const LOCK_FILE: &str = "LOCK";

/// A shard directory on a real disk.
pub struct GlommioBackend {
    dir: PathBuf,
    /// Holds the exclusive lock; released when the backend is dropped.
    _lock: File,
    /// Per file (device and inode: one file may be open through several
    /// descriptors, as a segment a dropped flush had opened is opened
    /// again by the next; found by a review), the last write issued to it
    /// that has not ended: the next write to that file waits for it (see
    /// `write_at`). An entry is removed by its own write when it ends, if
    /// no later write has taken its place. The write's task holds the file
    /// open, so an inode here is never one the file system reused.
    writes: Rc<RefCell<HashMap<FileKey, Rc<WriteEnd>>>>,
    /// Writes whose caller went away while they ran, run to their end by
    /// a task of the backend's (see `write_at`).
    orphans: Rc<Orphans>,
}

/// Writes whose future was dropped while they ran, for the backend's
/// orphan task to run to their end: a drop cannot spawn a task itself
/// (it may come as the executor is torn down, with no executor to spawn
/// on). That task spawns each, so they run side by side (one may wait
/// for another's end).
#[derive(Default)]
struct Orphans {
    queue: RefCell<Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>>,
    notify: Notify,
    /// The backend is gone: the task ends.
    closed: Cell<bool>,
}

impl Orphans {
    /// Runs until the backend is dropped, spawning every orphan handed
    /// over.
    async fn run(self: Rc<Self>) {
        loop {
            let seen = self.notify.generation();
            let batch = std::mem::take(&mut *self.queue.borrow_mut());
            let idle = batch.is_empty();
            for orphan in batch {
                glommio::spawn_local(orphan).detach();
            }
            if self.closed.get() {
                return;
            }
            if idle {
                self.notify.wait(seen).await;
            }
        }
    }
}

impl Drop for GlommioBackend {
    fn drop(&mut self) {
        self.orphans.closed.set(true);
        self.orphans.notify.notify_all();
    }
}

/// One write to the device ([`GlommioBackend::write_at`]), polled in its
/// caller's task; dropped while it runs, it is handed to the backend's
/// orphan task and runs to its end there.
struct DeviceWrite {
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>>>>>,
    end: WriteDone,
    orphans: Rc<Orphans>,
}

/// Marks a write ended (the next write to its file may start) and takes
/// it off the backend's list if no later write took its place.
#[derive(Clone)]
struct WriteDone {
    end: Rc<WriteEnd>,
    key: FileKey,
    writes: Rc<RefCell<HashMap<FileKey, Rc<WriteEnd>>>>,
}

impl WriteDone {
    fn finish(&self) {
        self.end.set();
        let mut writes = self.writes.borrow_mut();
        if writes.get(&self.key).is_some_and(|last| Rc::ptr_eq(last, &self.end)) {
            writes.remove(&self.key);
        }
    }
}

impl std::future::Future for DeviceWrite {
    type Output = io::Result<()>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let fut = self.fut.as_mut().expect("a write polled after it ended");
        let std::task::Poll::Ready(result) = fut.as_mut().poll(cx) else { return std::task::Poll::Pending };
        self.fut = None;
        self.end.finish();
        std::task::Poll::Ready(result)
    }
}

impl Drop for DeviceWrite {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            let end = self.end.clone();
            self.orphans.queue.borrow_mut().push(Box::pin(async move {
                let _ = fut.await;
                end.finish();
            }));
            self.orphans.notify.notify_all();
        }
    }
}

/// A file's identity: its device and inode numbers.
type FileKey = (u64, u64);

/// The end of one write (see `GlommioBackend::write_at`): set once, when
/// the write has completed or failed at the device.
#[derive(Default)]
struct WriteEnd {
    ended: Cell<bool>,
    notify: Notify,
}

impl WriteEnd {
    fn set(&self) {
        self.ended.set(true);
        self.notify.notify_all();
    }

    async fn wait(&self) {
        self.notify.wait_until(|| self.ended.get()).await
    }
}

/// A write buffer in DMA-able memory.
pub struct GlommioBuf(DmaBuffer);

impl WriteBuf for GlommioBuf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_bytes_mut()
    }
}

/// The bytes of a read.
pub struct GlommioRead(ReadResult);

impl AsRef<[u8]> for GlommioRead {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Tries at taking a shard directory's lock held by another process,
/// [`LOCK_RETRY_AFTER`] apart: 100 ms in all, far longer than `gyre
/// check`'s look at it, and short enough that a start over a running
/// node's directory still fails at once to a person.
const LOCK_TRIES: u32 = 20;
const LOCK_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(5);

impl GlommioBackend {
    /// Opens (creating if needed) and locks a data directory. Must run
    /// inside a glommio executor.
    pub async fn open(dir: impl AsRef<Path>) -> io::Result<GlommioBackend> {
        let dir = dir.as_ref().to_path_buf();
        let created = !dir.exists();
        std::fs::create_dir_all(&dir)?;
        // A new directory's entry is durable once its parent is synced: a
        // shard directory lost in a crash would be taken for lost data.
        if created {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(parent)?.sync_all()?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let mut lock =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path)?;
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                // A lock held for a moment: `gyre check` looks whether a
                // shard is in use with a shared lock it drops at once. A
                // start that met it failed (found by a review); a node
                // that holds the directory holds it for longer than this.
                Err(std::fs::TryLockError::WouldBlock) if tries < LOCK_TRIES => {
                    tries += 1;
                    glommio::timer::sleep(LOCK_RETRY_AFTER).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                    let holder = holder.lines().next().unwrap_or("").trim().to_string();
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("data directory {} is in use by another Gyre process ({holder})", dir.display()),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        // A full block: the DMA probe below must read a non-empty file.
        let mut text = format!("pid {}\n", std::process::id()).into_bytes();
        text.resize(BLOCK_SIZE, b'\n');
        lock.set_len(0)?;
        lock.write_all(&text)?;
        lock.sync_all()?;
        let probe = DmaFile::open(&lock_path).await.map_err(io::Error::from)?;
        let read = probe.read_at(0, BLOCK_SIZE).await.map_err(io::Error::from)?;
        if read.len() != BLOCK_SIZE {
            return Err(io::Error::other("short read probing the data directory's device"));
        }
        probe.close().await.map_err(io::Error::from)?;
        let orphans = Rc::new(Orphans::default());
        glommio::spawn_local(orphans.clone().run()).detach();
        Ok(GlommioBackend { dir, _lock: lock, writes: Rc::default(), orphans })
    }

    async fn open_with(&self, name: &str, create: bool, flags: i32) -> io::Result<Rc<DmaFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .custom_flags(flags)
            .dma_open(self.dir.join(name))
            .await
            .map_err(io::Error::from)?;
        Ok(Rc::new(f))
    }
}

/// The size of an open file, from its descriptor (`fstat`): right whatever
/// the file is called now. glommio's `DmaFile::file_size` statx'es the path
/// the file was opened under, which after a rename names no file (ENOENT:
/// compaction and scrub failed on every segment that began as the spare)
/// or another one (a newer `spare-segment.tmp`, with its size). An fstat
/// reads the inode in memory and does not wait for the device.
fn file_size(file: &DmaFile) -> io::Result<u64> {
    Ok(file_stat(file)?.0)
}

/// The identity of an open file: device and inode, as glommio read them
/// (`statx`) when it opened the file, so no system call per write. They
/// follow the file through renames, as the key must.
fn file_key(file: &DmaFile) -> FileKey {
    ((u64::from(file.dev_major()) << 32) | u64::from(file.dev_minor()), file.inode())
}

/// The size of an open file and how many names it has (`fstat`).
fn file_stat(file: &DmaFile) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: the descriptor is open while `file` is borrowed (glommio
    // closes it only on close or drop, and this neither closes nor keeps
    // it); fstat writes only the `stat` it is given, which is initialised
    // when it returns 0.
    let st = unsafe {
        if libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        st.assume_init()
    };
    let size = u64::try_from(st.st_size).map_err(|_| io::Error::other(format!("negative file size {}", st.st_size)))?;
    Ok((size, st.st_nlink as u64))
}

/// The space of the file system holding `path`: bytes free for an
/// unprivileged writer (`f_bavail`) and its whole size (`f_blocks`), from
/// `statvfs`. A node sizes its default disk reserve from the size
/// (`NodeConfig::shard_engine_config`); engines watch what is free.
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and
    // statvfs writes only the struct it is given, which is initialised
    // when it returns 0.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        st.assume_init()
    };
    let unit = st.f_frsize as u64;
    Ok(FsSpace { free: (st.f_bavail as u64).saturating_mul(unit), total: (st.f_blocks as u64).saturating_mul(unit) })
}

/// What [`fs_space`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Bytes an unprivileged writer can still take.
    pub free: u64,
    /// The file system's size.
    pub total: u64,
}

/// A short write is a disk that filled during the write: reported as one
/// (`StorageFull`), so that the engine retries it once there is room
/// instead of failing for good (the probe write of `write_at` may even
/// have found room again).
fn full_write(n: usize, want: usize) -> io::Result<()> {
    if n != want {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("short write: {n} of {want} bytes (the disk filled during the write)"),
        ));
    }
    Ok(())
}

/// Writes the whole buffer at `off` (see `full_write` for a short write).
async fn write_whole(file: &DmaFile, buf: GlommioBuf, off: u64) -> io::Result<()> {
    let want = buf.0.len();
    let n = file.write_at(buf.0, off).await.map_err(io::Error::from)?;
    // Not for a write that wrote nothing: its first block may be one
    // rewritten with records acknowledged before, which zeros must not
    // replace (a direct write returns an error, not 0, when it cannot
    // write at all).
    if n < want && n > 0 && n % BLOCK_SIZE == 0 {
        let mut probe = file.alloc_dma_buffer(BLOCK_SIZE);
        probe.as_bytes_mut().fill(0);
        file.write_at(probe, off + n as u64).await.map_err(io::Error::from)?;
    }
    full_write(n, want)
}

impl Backend for GlommioBackend {
    type File = Rc<DmaFile>;
    type Buf = GlommioBuf;
    type Read = GlommioRead;

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    async fn open(&self, name: &str, create: bool) -> io::Result<Rc<DmaFile>> {
        self.open_with(name, create, 0).await
    }

    /// `O_DSYNC` with `O_DIRECT`: ext4 completes such a write only after
    /// a cache flush of the device (or with FUA where the device has it),
    /// in the kernel, as one request: no fdatasync to submit and wait for.
    async fn open_synced(&self, name: &str, create: bool) -> io::Result<Rc<DmaFile>> {
        self.open_with(name, create, libc::O_DSYNC).await
    }

    async fn preallocate(&self, file: &Rc<DmaFile>, size: u64) -> io::Result<()> {
        file.pre_allocate(size, true).await.map_err(io::Error::from)
    }

    async fn zero_fill(&self, file: &Rc<DmaFile>, size: u64) -> io::Result<()> {
        // The size first, in one metadata change; then the blocks, a piece
        // at a time, so the requests on the shard run in between.
        file.pre_allocate(size, false).await.map_err(io::Error::from)?;
        let mut off = 0;
        while off < size {
            let len = ZERO_FILL_PIECE.min((size - off) as usize);
            self.write_at(file, self.alloc(file, len), off).await?;
            off += len as u64;
            yield_to_reactor().await;
        }
        file.fdatasync().await.map_err(io::Error::from)
    }

    fn alloc(&self, file: &Rc<DmaFile>, len: usize) -> GlommioBuf {
        self.alloc_with(file, len, &[])
    }

    fn alloc_with(&self, file: &Rc<DmaFile>, len: usize, data: &[u8]) -> GlommioBuf {
        assert_eq!(len % BLOCK_SIZE, 0, "unaligned buffer length {len}");
        let mut buf = file.alloc_dma_buffer(len);
        let bytes = buf.as_bytes_mut();
        bytes[..data.len()].copy_from_slice(data);
        bytes[data.len()..].fill(0);
        GlommioBuf(buf)
    }

    /// A short write is what a disk that fills during the write gives
    /// (ext4 and tmpfs write what fits and return its length; only the
    /// next write says ENOSPC). Taken as a plain error it failed the shard
    /// for good, where a full disk is to be retried once there is room. So
    /// a short write asks again, with one block of zeros where its data
    /// stopped (inside the range this write was to fill: the log beyond
    /// its data is zeros anyway, and a retried flush rewrites the range),
    /// and reports that write's error if it fails.
    ///
    /// A write waits for the previous write to the same file to end, and
    /// is never abandoned half way: if this future is dropped once polled
    /// (the engine's caller went away), the write still runs to its end
    /// (in the backend's orphan task), and a later write to the same file,
    /// the same blocks included, starts only after it ended. Without that,
    /// a write glommio had already handed to the device stayed in flight
    /// (it cannot be called back) and could land after the next flush's
    /// write of the same block, which has more records: those records
    /// were then lost. The engine's writes to one file are one after
    /// another anyway (one flush leader), so the wait costs nothing but
    /// after such a drop; and the write runs in its caller's task, not a
    /// task of its own, so its completion wakes its caller directly (a
    /// task per write costs an allocation and a pass of the run queue; in
    /// measurements the two forms were within the VM's noise:
    /// perf/RESULTS.md, twentieth session).
    async fn write_at(&self, file: &Rc<DmaFile>, buf: GlommioBuf, off: u64) -> io::Result<()> {
        assert_eq!(off % BLOCK_SIZE as u64, 0, "unaligned write offset {off}");
        assert!(!buf.0.is_empty(), "a write of no bytes");
        let key = file_key(file);
        let end = Rc::new(WriteEnd::default());
        let before = self.writes.borrow_mut().insert(key, end.clone());
        let file = file.clone();
        let fut = Box::pin(async move {
            if let Some(before) = before {
                before.wait().await;
            }
            write_whole(&file, buf, off).await
        });
        let end = WriteDone { end, key, writes: self.writes.clone() };
        DeviceWrite { fut: Some(fut), end, orphans: self.orphans.clone() }.await
    }

    async fn sync(&self, file: &Rc<DmaFile>) -> io::Result<()> {
        file.fdatasync().await.map_err(io::Error::from)
    }

    async fn read_at(&self, file: &Rc<DmaFile>, off: u64, len: usize) -> io::Result<GlommioRead> {
        file.read_at(off, len).await.map(GlommioRead).map_err(io::Error::from)
    }

    /// By descriptor (fstat), not glommio's by-path `DmaFile::file_size`.
    async fn size(&self, file: &Rc<DmaFile>) -> io::Result<u64> {
        file_size(file)
    }

    async fn truncate(&self, file: &Rc<DmaFile>, len: u64) -> io::Result<()> {
        file.truncate(len).await.map_err(io::Error::from)
    }

    /// On glommio's blocking pool: unlinking a large preallocated segment
    /// frees its extents, which takes ext4 milliseconds, and this runs on a
    /// shard that is serving requests (compaction).
    async fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.dir.join(name);
        glommio::executor().spawn_blocking(move || std::fs::remove_file(path)).await
    }

    /// Truncates the file from its end, `RELEASE_PIECE` at a time, then
    /// closes it (then nothing is left to free). Only as the last handle
    /// (a read in flight through another would come back short), and only
    /// once the file has no name left (a hard link made to it, say by a
    /// backup, keeps its data): otherwise the handle is closed as it is.
    async fn release(&self, file: Rc<DmaFile>) -> io::Result<()> {
        let Ok(file) = Rc::try_unwrap(file) else { return Ok(()) };
        let (mut len, links) = file_stat(&file)?;
        if links > 0 {
            return file.close().await.map_err(io::Error::from);
        }
        while len > 0 {
            len = len.saturating_sub(RELEASE_PIECE);
            file.truncate(len).await.map_err(io::Error::from)?;
            yield_to_reactor().await;
        }
        file.close().await.map_err(io::Error::from)
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        // On the shard's thread, done by the first poll: a rename handed to
        // glommio's blocking pool runs even if its future is dropped, and
        // could then land after the engine moved on. A flush leader
        // dropped at the spare's rename to `seg-N` left the next leader to
        // create `seg-N` itself, and the late rename replaced that file,
        // already written and acknowledged, with the spare (found by a
        // review); a late `spare-segment.tmp` rename could likewise take a
        // newer spare's place. A rename is a metadata change of a few
        // microseconds, made once a segment.
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    async fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        write_file_in_pieces(self, name, data.len(), data.len(), |off, piece| {
            piece.copy_from_slice(&data[off..off + piece.len()])
        })
        .await
    }

    async fn read_file(&self, name: &str) -> io::Result<Vec<u8>> {
        let f = DmaFile::open(self.dir.join(name)).await.map_err(io::Error::from)?;
        let size = file_size(&f)? as usize;
        let data = if size == 0 { Vec::new() } else { f.read_at(0, size).await.map_err(io::Error::from)?.to_vec() };
        f.close().await.map_err(io::Error::from)?;
        if data.len() != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{name}: short read")));
        }
        Ok(data)
    }

    /// On glommio's blocking pool, like `remove`: a directory fsync waits for
    /// a journal commit (after every seal's hint file and every compacted
    /// segment), milliseconds the shard would otherwise spend blocked.
    async fn sync_dir(&self) -> io::Result<()> {
        let dir = self.dir.clone();
        glommio::executor().spawn_blocking(move || File::open(&dir)?.sync_all()).await
    }

    fn free_space(&self) -> io::Result<u64> {
        Ok(fs_space(&self.dir)?.free)
    }

    /// See [`yield_to_reactor`].
    async fn yield_now(&self) {
        yield_to_reactor().await
    }
}

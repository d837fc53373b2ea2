//! The I/O a shard's storage engine needs, behind one small trait.
//!
//! Owns: the boundary between the engine's decisions and the disk. Two
//! implementations: [`glommio::GlommioBackend`] (io_uring, O_DIRECT, feature
//! `node`) for real, and [`mem::MemBackend`] for tests, which keeps what was
//! fsynced and can crash, losing or tearing what was not.
//!
//! Invariant: writes are whole blocks at block-aligned offsets (the engine
//! guarantees it, both backends assert it); a write or sync that returns
//! `Ok` has fully happened.

#[cfg(feature = "node")]
pub mod glommio;
pub mod mem;

use std::io;

/// A buffer for one aligned write.
pub trait WriteBuf {
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// Everything the engine does to the disk. Single-threaded: futures need
/// not be `Send` (thread per core).
#[allow(async_fn_in_trait, reason = "engines are driven on one thread; no Send bound is wanted")]
pub trait Backend {
    /// An open file; clones share the handle (a read in flight keeps a
    /// removed file readable).
    type File: Clone;
    type Buf: WriteBuf;
    /// Bytes of a read.
    type Read: AsRef<[u8]>;

    /// Names of the files in the data directory.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing, creating it if asked.
    async fn open(&self, name: &str, create: bool) -> io::Result<Self::File>;
    /// [`Self::open`], with every write through this handle durable once
    /// it returns `Ok` (`O_DSYNC`): its data, and the metadata needed to
    /// read it back, need no [`Self::sync`] after it. A write that could
    /// not be made durable fails. Other handles of the file are unchanged.
    async fn open_synced(&self, name: &str, create: bool) -> io::Result<Self::File>;
    /// Reserves `size` bytes for the file so appends do not allocate.
    async fn preallocate(&self, file: &Self::File, size: u64) -> io::Result<()>;
    /// Makes the first `size` bytes of `file` written zeros, synced, so
    /// that later writes into them change no file metadata (no size to
    /// raise, no unwritten extents to convert) and an fdatasync after them
    /// has no journal commit to wait for. Background work: gives way
    /// between pieces. A backend without such metadata does nothing.
    async fn zero_fill(&self, file: &Self::File, size: u64) -> io::Result<()>;
    /// A zeroed buffer of `len` bytes (a multiple of the block size) for a
    /// write to `file`.
    fn alloc(&self, file: &Self::File, len: usize) -> Self::Buf;
    /// A buffer of `len` bytes for a write to `file` that starts with
    /// `data` and is zeros after it: [`Self::alloc`] and a copy, without
    /// zeroing first what the copy overwrites (a log flush is megabytes).
    fn alloc_with(&self, file: &Self::File, len: usize, data: &[u8]) -> Self::Buf;
    /// Writes the whole buffer at `off` (block aligned). A write whose
    /// future is dropped once polled either never happens or runs to its
    /// end before any later write to the same file starts (a flush leader
    /// dropped mid-write must not have its write land over the next
    /// flush's write of the same block).
    async fn write_at(&self, file: &Self::File, buf: Self::Buf, off: u64) -> io::Result<()>;
    /// fdatasync.
    async fn sync(&self, file: &Self::File) -> io::Result<()>;
    /// Reads up to `len` bytes at `off` (short only at end of file).
    async fn read_at(&self, file: &Self::File, off: u64, len: usize) -> io::Result<Self::Read>;
    async fn size(&self, file: &Self::File) -> io::Result<u64>;
    async fn truncate(&self, file: &Self::File, len: u64) -> io::Result<()>;
    /// Unlinks a file by name (open handles stay readable). Unlike
    /// [`Self::rename`], a removal whose future is dropped may still happen
    /// later (glommio's runs on its blocking pool, where a job outlives its
    /// future). A caller may drop one only on a name nothing creates again
    /// before the removal is done, or where a late removal of the new file
    /// is harmless. The engine's names: segment and hint numbers are never
    /// reused; a removal at open is dropped only with the open; the one
    /// reused name, the spare being filled, is removed only after a failed
    /// fill, and a late removal of the next fill's file makes that fill's
    /// rename fail (a warning; the spare after it is made).
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Closes a handle of a file already removed. Where freeing a file's
    /// space costs the closing thread time in proportion to its size, and
    /// this is the last handle, the space is freed a piece at a time first,
    /// giving way between pieces. A handle still held elsewhere (a read in
    /// flight) is only dropped, and its data stays readable there; a file
    /// that still has a name (a hard link) is only closed.
    async fn release(&self, file: Self::File) -> io::Result<()>;
    /// Renames a file (open handles stay valid); durable once the
    /// directory is synced. Done when its first poll returns: a rename
    /// whose future is dropped must not happen later.
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Replaces a whole small file durably: temporary file, sync, rename,
    /// directory sync.
    async fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Reads a whole small file.
    async fn read_file(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Makes creations, renames and removals durable. May still run after
    /// its future is dropped, as [`Self::remove`] (harmless: a sync).
    async fn sync_dir(&self) -> io::Result<()>;
    /// Lets other tasks run (background work calls it between units):
    /// must actually give way, not only when a time slice has expired.
    async fn yield_now(&self);
    /// Bytes the data directory's file system has free for this process
    /// (`statvfs`'s `f_bavail`: what an unprivileged writer can still
    /// take). Cheap (no device I/O): the engine asks at each new segment
    /// and on the compaction driver's looks ([`crate::storage::Engine::refresh_free_space`]).
    fn free_space(&self) -> io::Result<u64>;
}

/// Replaces file `name` durably, as [`Backend::write_file`] promises (a
/// temporary file written and synced, renamed over `name`, the directory
/// synced), with its `len` bytes made by `fill(offset, piece)` at most
/// `piece_len` bytes at a time, giving way between pieces: a sealed
/// segment's hint file is megabytes, and the shard's requests run while
/// it is written. A backend with real files implements `write_file` with
/// it (one piece); the engine writes hints with it.
pub async fn write_file_in_pieces<B: Backend>(
    backend: &B,
    name: &str,
    len: usize,
    piece_len: usize,
    mut fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let file = backend.open(&tmp, true).await?;
    let mut off = 0;
    while off < len {
        if off > 0 {
            backend.yield_now().await;
        }
        let piece = piece_len.min(len - off);
        let mut buf = backend.alloc(&file, piece.next_multiple_of(crate::limits::BLOCK_SIZE));
        fill(off, &mut buf.bytes_mut()[..piece]);
        backend.write_at(&file, buf, off as u64).await?;
        off += piece;
    }
    // The last piece was padded to a whole block (and a stale temporary
    // file may have been longer).
    backend.truncate(&file, len as u64).await?;
    backend.sync(&file).await?;
    drop(file);
    backend.rename(&tmp, name).await?;
    backend.sync_dir().await
}

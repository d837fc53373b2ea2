//! The glommio shell: runs storage engines on real executors and disks.
//!
//! Owns: executor construction, the wall clock, and the background tasks
//! that drive an engine (the durability ticker, and compaction in a task
//! queue of its own: foreground work first while compaction keeps up, an
//! equal share once it falls far behind, and the engine's writes waiting
//! for it beyond that: `Engine::handle_compaction_check`). Of the storage
//! path, this is the only place (with the binaries) that reads the wall
//! clock or the monotonic clock; the engine gets `now` as an argument.
//! (The node's connection, coordination and peer code reads the monotonic
//! clock for deadlines.)

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::task::JoinHandle;
use glommio::{executor, Latency, LocalExecutorBuilder, Placement, Shares};

use crate::notify::Notify;
use crate::storage::backend::glommio::GlommioBackend;
use crate::storage::scan::COMPACTION_BACKLOG_URGENT;
use crate::storage::{Engine, EngineConfig, RecoveryReport, StorageError};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs `f` on a new glommio executor on this thread, pinned to `cpu` if
/// given. glommio needs locked memory for its io_uring rings; if this fails
/// with a memlock error, raise `ulimit -l` (see README).
pub fn run_executor<T: 'static>(
    name: &str,
    cpu: Option<usize>,
    f: impl std::future::Future<Output = T> + 'static,
) -> anyhow::Result<T> {
    run_executor_with(name, cpu, Duration::ZERO, f)
}

/// [`run_executor`], spinning for `spin` (zero: not at all) before the
/// executor parks when it runs out of work (trades CPU for fewer sleeps
/// and wake-ups).
pub fn run_executor_with<T: 'static>(
    name: &str,
    cpu: Option<usize>,
    spin: Duration,
    f: impl std::future::Future<Output = T> + 'static,
) -> anyhow::Result<T> {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let mut builder = LocalExecutorBuilder::new(placement).name(name);
    if !spin.is_zero() {
        builder = builder.spin_before_park(spin);
    }
    let ex = builder
        .make()
        .map_err(|e| anyhow::anyhow!("starting a glommio executor failed: {e} (is `ulimit -l` high enough?)"))?;
    Ok(ex.run(f))
}

/// A shard engine on the real disk.
pub type DiskEngine = Engine<GlommioBackend>;

/// Opens a shard directory with the glommio backend.
pub async fn open_shard(dir: &Path, config: EngineConfig) -> anyhow::Result<(DiskEngine, RecoveryReport)> {
    let backend = GlommioBackend::open(dir)
        .await
        .map_err(|e| anyhow::anyhow!("opening data directory {}: {e}", dir.display()))?;
    Ok(Engine::open(backend, config).await?)
}

/// Handle that stops the background tasks of [`spawn_background`].
///
/// A task stops at its next wait, never in the middle of its work: a task
/// cancelled in a flush left its log write in flight (glommio cannot call
/// back a write the device has), and the final sync's write of the same
/// blocks could then be overtaken by it, putting back older bytes over
/// records already acknowledged (found by a review). The backend now makes
/// a later write wait for such a write (`Backend::write_at`); stopping
/// only at a wait keeps shutdown from cutting any work short in the first
/// place.
#[derive(Clone, Default)]
pub struct Stop {
    /// The tasks, to wait for: each holds an engine clone, and the engine
    /// (with its directory lock) is released only when the last clone is
    /// dropped.
    tasks: Rc<RefCell<Vec<JoinHandle<()>>>>,
    /// Set by [`Stop::stop`].
    stopping: Rc<Cell<bool>>,
    /// Wakes the tasks waiting in [`Stop::or_stopped`].
    woken: Rc<Notify>,
}

impl Stop {
    /// Has the background tasks end at their next wait, and waits until
    /// they have (and dropped their engine clones). A compaction pass
    /// under way ends after its current batch if the engine is closing
    /// (`Engine::begin_close`), else when it is done.
    pub async fn stop(&self) {
        self.stopping.set(true);
        self.woken.notify_all();
        let tasks = self.tasks.take();
        for t in tasks {
            t.await;
        }
    }

    /// `f`'s output, or `None` once [`Stop::stop`] has been called (then
    /// `f` is dropped: only waits go in here, never work).
    async fn or_stopped<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        let seen = self.woken.generation();
        if self.stopping.get() {
            return None;
        }
        futures_lite::future::or(async { Some(f.await) }, async {
            self.woken.wait(seen).await;
            None
        })
        .await
    }
}

/// How often the compaction loop looks at its backlog between passes;
/// also the least time between two passes (a `compact_every` below it is
/// rounded up to it), so that a pass that returns at once (a full or
/// failed engine) never spins the shard.
const COMPACTION_CHECK: Duration = Duration::from_millis(100);

/// Compaction's CPU shares, which glommio reads when the queue is about to
/// run, at most every 250 ms: set by the
/// compaction loop from how far it is behind ([`compaction_shares`]) each
/// time it looks. A cell, not the engine: the task queue outlives the
/// loop, and an engine clone held there would keep the shard's directory
/// locked after `Stop::stop`.
struct CompactionShares(Rc<std::cell::Cell<usize>>);

impl glommio::SharesManager for CompactionShares {
    fn shares(&self) -> usize {
        self.0.get()
    }
}

/// How often at most the compaction loop reports that writes waited for
/// compaction, or were refused for lack of space (both can start and stop
/// several times a second for as long as the writes outrun compaction).
const STALL_REPORT: Duration = Duration::from_secs(10);

/// Counts of something that starts again and again (write stalls, low
/// space), reported at most every [`STALL_REPORT`], the first at once.
#[derive(Default)]
struct Episodes {
    /// The count reported so far.
    count: u64,
    /// When it was last reported; `None`: never yet.
    at: Option<std::time::Instant>,
}

impl Episodes {
    /// With the count now at `count`: the episodes since the last report
    /// and the seconds since then (0 for the first), if a report is due.
    fn due(&mut self, count: u64) -> Option<(u64, u64)> {
        if count <= self.count || self.at.is_some_and(|at| at.elapsed() < STALL_REPORT) {
            return None;
        }
        let since = self.at.map_or(0, |at| at.elapsed().as_secs());
        let times = count - std::mem::replace(&mut self.count, count);
        self.at = Some(std::time::Instant::now());
        Some((times, since))
    }
}

/// Logs the write stalls and low-space episodes the compaction loop's
/// look found, as [`Episodes`] allows.
fn report(stalls: &mut Episodes, low: &mut Episodes, check: crate::storage::CompactionCheck) {
    if let Some((times, since_s)) = stalls.due(check.stalls) {
        tracing::warn!(
            times,
            since_s,
            backlog = check.backlog,
            "compaction fell behind the writes: writes waited for it before they were taken"
        );
    }
    if let Some((times, since_s)) = low.due(check.low_space_episodes) {
        tracing::warn!(
            times,
            since_s,
            "the disk ran low on space: writes were refused while compaction reclaimed what it could \
             (STATS: disk_free_bytes, disk_reserve_bytes, low_space_refusals)"
        );
    }
}

/// Held by the compaction loop: tells the engine when the loop ends,
/// however it ends.
struct Driving(DiskEngine);

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.handle_compaction_stopped();
    }
}

/// Starts the engine's durability ticker, its flusher (`interval` and
/// `never`) and a compaction loop (which also keeps a spare segment ready:
/// `Engine::prepare_spare`) in a task queue of its own, whose CPU shares
/// are few while compaction keeps up and grow with its backlog. All run until
/// `stop` stops them.
pub fn spawn_background(engine: &DiskEngine, stop: &Stop, compact_every: Duration) {
    let tick = Duration::from_millis(engine.config().fsync.tick_ms());
    let (e, s) = (engine.clone(), stop.clone());
    let ticker = glommio::spawn_local(async move {
        // At a fixed rate, one tick every `tick` from the last one's start
        // (at once after one that took longer): a write waits at most a
        // tick and one sync to be made durable under `interval`, not a
        // tick after each sync's end.
        let mut next = std::time::Instant::now() + tick;
        loop {
            let wait = next.saturating_duration_since(std::time::Instant::now());
            if s.or_stopped(glommio::timer::sleep(wait)).await.is_none() {
                break;
            }
            next = (next + tick).max(std::time::Instant::now());
            // A failed tick has failed the engine, which logged why.
            if e.tick().await.is_err() {
                break;
            }
        }
    })
    .detach();
    // Under `interval` and `never` no writer waits for the flush a full
    // buffer needs (`Engine::flush_wanted`): this task leads it, at once.
    if !engine.config().synced_writes() {
        let (e, s) = (engine.clone(), stop.clone());
        let flusher = glommio::spawn_local(async move {
            loop {
                if s.or_stopped(e.flush_wanted()).await.is_none() {
                    break;
                }
                match e.flush().await {
                    Ok(()) | Err(StorageError::DiskFull(_)) => {}
                    // The engine logged the failure as it recorded it, and
                    // refuses writes from now on: nothing left to flush.
                    Err(_) => break,
                }
            }
        })
        .detach();
        stop.tasks.borrow_mut().push(flusher);
    }
    // Made before the task: the engine is driven from here on, and the
    // guard lets waiting writes go however the task ends, even one that
    // never runs.
    let driving = Driving(engine.clone());
    let shares = Rc::new(std::cell::Cell::new(engine.handle_compaction_check().shares()));
    let manager = Rc::new(CompactionShares(shares.clone()));
    let tq = executor().create_task_queue(Shares::Dynamic(manager), Latency::NotImportant, "compaction");
    let (e, s) = (engine.clone(), stop.clone());
    let compactor = glommio::spawn_local_into(
        async move {
            // Writes wait for compaction only while this loop runs: its
            // end (a failed engine, or `Stop::stop`) lets them go.
            let _driving = driving;
            // Writes waiting for compaction, and refused for lack of
            // space, reported at most every `STALL_REPORT`: every episode
            // since the engine opened (one may begin as it opens, on a
            // disk already short of space).
            let (mut stalls, mut low) = (Episodes::default(), Episodes::default());
            // Reported once per run of failures (a full disk fails it on
            // every pass).
            let mut spare_failing = false;
            // Whether the last pass reclaimed anything: one that did not
            // (segments kept for corrupt records, a full disk, a pass
            // already running) gives no reason to hurry the next.
            let mut progressed = true;
            // Whether the disk was low on space at the last look: a pass
            // is due as it becomes so (it takes more garbage then).
            let mut was_low = false;
            loop {
                match e.prepare_spare().await {
                    Ok(()) => spare_failing = false,
                    Err(StorageError::Failed(_)) => break,
                    Err(err) if !spare_failing => {
                        spare_failing = true;
                        tracing::warn!(error = %err, "no spare segment: the next segment is created when it is needed");
                    }
                    Err(_) => {}
                }
                // The next pass in `compact_every`, or, after a pass that
                // reclaimed space, as soon as the garbage it could reclaim
                // outgrows the live data. Always after one sleep at least:
                // a pass that returns at once must not spin the shard.
                let due = std::time::Instant::now() + compact_every;
                loop {
                    if s.or_stopped(glommio::timer::sleep(COMPACTION_CHECK)).await.is_none() {
                        return;
                    }
                    let check = e.handle_compaction_check();
                    shares.set(check.shares());
                    report(&mut stalls, &mut low, check);
                    // Waiting writes make a pass due at once, whatever the
                    // last one did (the engine lets them go when a pass
                    // fails); so does a disk that has just run low on
                    // space, and one still low while there is garbage a
                    // pass would take (writes are refused until it has
                    // room; deletes make garbage meanwhile).
                    let newly_low = check.low_space && !was_low;
                    was_low = check.low_space;
                    let urgent = check.stalled
                        || newly_low
                        || check.low_reclaimable > 0
                        || (progressed && check.backlog >= COMPACTION_BACKLOG_URGENT);
                    if urgent || std::time::Instant::now() >= due {
                        break;
                    }
                }
                progressed = match e.compact(now_ms()).await {
                    Ok(st) if st.segments_removed > 0 => {
                        tracing::info!(?st, "compaction pass");
                        true
                    }
                    Ok(_) => false,
                    Err(StorageError::Failed(_)) => break,
                    Err(err) => {
                        tracing::error!(error = %err, "compaction failed");
                        false
                    }
                };
            }
        },
        tq,
    )
    .expect("compaction task queue exists")
    .detach();
    stop.tasks.borrow_mut().extend([ticker, compactor]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f`'s output, or `None` if it is not done within 10 s: a wait the
    /// test makes fails, rather than hangs, if nothing ends it.
    async fn within<T>(f: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(f.await) }, async {
            glommio::timer::sleep(Duration::from_secs(10)).await;
            None
        })
        .await
    }

    /// `Stop::stop` ends a task at its wait (here one that would never
    /// end) but lets the work under way finish: a task cancelled in a
    /// flush left its write in flight (found by a review). One task is
    /// waiting when the stop comes, another is in the middle of its work;
    /// channels, not timers, put them there. (Found by a review: the
    /// check sat in a detached task, on a wait that could only end with
    /// `None` or hang, and the one task had finished its work, by a timer,
    /// before it waited, so no wait was ever under way at the stop.)
    #[test]
    fn stop_ends_waits_but_never_cuts_work_short() {
        use glommio::channels::local_channel;
        run_executor("stop-test", None, async {
            let stop = Stop::default();
            // Waiting for work that never comes.
            let (waiting_tx, waiting) = local_channel::new_bounded(1);
            let waited = Rc::new(Cell::new(None));
            let (s, w) = (stop.clone(), waited.clone());
            let waiter = glommio::spawn_local(async move {
                // Received once this task is parked in the wait below (it
                // gives way nowhere before).
                waiting_tx.try_send(()).expect("room for one");
                w.set(Some(s.or_stopped(std::future::pending::<()>()).await));
            })
            .detach();
            // Working (a flush, say, not under `or_stopped`) until the
            // test lets it finish, once the stop has begun.
            let (go_tx, go) = local_channel::new_bounded(1);
            let (working_tx, working) = local_channel::new_bounded(1);
            let done_after_stop = Rc::new(Cell::new(None));
            let (s, d) = (stop.clone(), done_after_stop.clone());
            let worker = glommio::spawn_local(async move {
                working_tx.try_send(()).expect("room for one");
                go.recv().await.expect("the test lets the work finish");
                d.set(Some(s.stopping.get()));
                // Then waiting for more work: ends at once, stopped.
                s.or_stopped(std::future::pending::<()>()).await;
            })
            .detach();
            stop.tasks.borrow_mut().extend([waiter, worker]);
            within(waiting.recv()).await.flatten().expect("the waiting task started");
            within(working.recv()).await.flatten().expect("the working task started");
            let stopped = within(futures_lite::future::zip(stop.stop(), async {
                let _ = go_tx.send(()).await;
            }))
            .await;
            assert!(stopped.is_some(), "the stop did not end the tasks' waits within 10 s");
            assert_eq!(waited.get(), Some(None), "the wait under way ends, stopped");
            assert_eq!(done_after_stop.get(), Some(true), "the stop cut the work short (or came after it)");
            // A wait that begins after the stop ends at once.
            let late = within(stop.or_stopped(std::future::pending::<()>())).await;
            assert_eq!(late, Some(None), "a wait begun after the stop did not end");
        })
        .unwrap();
    }

    /// The first episodes are reported at once, later ones only after
    /// `STALL_REPORT`, and nothing new is never reported.
    #[test]
    fn episodes_are_reported_at_once_then_at_most_every_so_often() {
        let mut e = Episodes::default();
        assert_eq!(e.due(0), None);
        assert_eq!(e.due(3), Some((3, 0)));
        assert_eq!(e.due(3), None);
        assert_eq!(e.due(5), None, "within STALL_REPORT of the last report");
        e.at = std::time::Instant::now().checked_sub(STALL_REPORT);
        assert_eq!(e.due(5).map(|(times, _)| times), Some(2), "the two since, once it has passed");
    }
}

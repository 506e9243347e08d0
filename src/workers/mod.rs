//! The worker pool: claims due jobs up to the concurrency target, runs them off the
//! async runtime under a heartbeated lease, and writes each outcome through one
//! guarded transition. Also rescues expired leases and checkpoints the WAL.

pub mod calibrate;
pub mod caption;
pub mod concurrency;
pub mod governor;
pub mod vram;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use crate::queue::{
    Finish, FinishOp, Job, JobErrorInfo, JobEvents, RetryPolicy, Store, Wakeup, now_ms,
};

/// What a handler produced for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerOutput {
    /// Model id and revision.
    pub model: String,
    /// Result JSON.
    pub output: serde_json::Value,
}

/// How a job attempt failed; decides the next state.
#[derive(Debug, Clone, PartialEq)]
pub enum JobFailure {
    /// Will never work (missing file, bad image, invalid parameters): fail now.
    Permanent(JobErrorInfo),
    /// May work later: retry with backoff.
    Transient(JobErrorInfo),
    /// Out of device memory: requeue without counting the attempt.
    OutOfMemory(JobErrorInfo),
    /// Stopped because its cancel flag was set.
    Cancelled,
    /// The device is unusable: release the job and stop the process.
    DeviceFault(JobErrorInfo),
}

/// Controls handed to a running job.
#[derive(Debug, Clone)]
pub struct JobControl {
    /// Set when the job should stop at the next token.
    pub cancel: Arc<AtomicBool>,
    /// Receives generated text as it appears, when a client streams this job.
    pub stream: Option<mpsc::UnboundedSender<String>>,
}

/// Runs one job. Blocking: the pool calls it on a blocking thread.
pub trait JobHandler: Send + Sync + 'static {
    /// Performs the job's work.
    fn handle(&self, job: &Job, ctl: &JobControl) -> Result<HandlerOutput, JobFailure>;

    /// Whether `handle` may block (inference does); `false` lets the pool call it on
    /// the async runtime and skip a thread hand-off per job. Default: `true`.
    fn blocks(&self) -> bool {
        true
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Identifies this process's leases (unique per host and process).
    pub owner: String,
    /// The prefix every lease of this instance (host and data folder) starts with; at
    /// start, leases under it are this instance's earlier runs and are rescued at once.
    pub own_prefix: Option<String>,
    /// Lease length.
    pub lease: Duration,
    /// Fallback poll when no wake-up arrives (at least 1 s).
    pub poll_interval: Duration,
    /// Most concurrent jobs.
    pub max_concurrency: usize,
    /// Concurrency to start at (the adaptive controller starts low); default the maximum.
    pub initial_concurrency: Option<usize>,
    /// Time running jobs get to finish on shutdown before they are released.
    pub shutdown_grace: Duration,
    /// Cap on out-of-memory requeues of one job.
    pub max_oom_retries: i64,
    /// Backoff between attempts.
    pub retry: RetryPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            owner: format!("captiond-{}-{}", std::process::id(), Uuid::now_v7()),
            own_prefix: None,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            max_concurrency: 1,
            initial_concurrency: None,
            shutdown_grace: Duration::from_secs(30),
            max_oom_retries: 10,
            retry: RetryPolicy::default(),
        }
    }
}

struct Running {
    attempt: i64,
    flags: Flags,
}

/// The flags a running job shares with the pool.
#[derive(Clone)]
struct Flags {
    cancel: Arc<AtomicBool>,
    user_cancel: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
}

/// Streams registered by clients before a job starts.
type StreamMap = Mutex<HashMap<Uuid, mpsc::UnboundedSender<String>>>;

struct Inner {
    store: Store,
    handler: Arc<dyn JobHandler>,
    wakeup: Wakeup,
    events: JobEvents,
    cfg: PoolConfig,
    target: AtomicUsize,
    running: Mutex<HashMap<Uuid, Running>>,
    streams: StreamMap,
    paused: AtomicBool,
    vram_blocked: AtomicBool,
    stop_claiming: CancellationToken,
    releasing: AtomicBool,
    completed: AtomicU64,
    failed: AtomicU64,
    out_of_memory: AtomicU64,
    fatal: watch::Sender<Option<String>>,
}

/// Live figures of the pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStats {
    /// Jobs running now.
    pub busy: usize,
    /// Free slots under the target.
    pub idle: usize,
    /// Current concurrency target.
    pub target: usize,
    /// Whether claiming is paused.
    pub paused: bool,
    /// Jobs this process finished successfully.
    pub completed: u64,
    /// Jobs this process saw fail for good.
    pub failed: u64,
    /// Out-of-memory errors this process saw.
    pub out_of_memory: u64,
    /// Claiming paused by repeated out-of-memory errors at concurrency 1.
    pub vram_blocked: bool,
    /// Most concurrent jobs allowed by the settings.
    pub max: usize,
}

/// Handle to the running pool.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
    dispatcher: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    heartbeat: Arc<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("owner", &self.inner.cfg.owner)
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// Rescues jobs a previous instance held, then starts dispatching.
    pub async fn start(
        store: Store,
        handler: Arc<dyn JobHandler>,
        wakeup: Wakeup,
        events: JobEvents,
        cfg: PoolConfig,
    ) -> Result<Self, crate::queue::StoreError> {
        let rescued = store.rescue_on_start(cfg.own_prefix.as_deref()).await?;
        if rescued > 0 {
            info!(rescued, "returned jobs held by a previous run to the queue");
        }
        let paused = store.is_paused().await?;
        let (fatal, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            store,
            handler,
            wakeup,
            events,
            target: AtomicUsize::new(
                cfg.initial_concurrency
                    .unwrap_or(cfg.max_concurrency)
                    .clamp(1, cfg.max_concurrency.max(1)),
            ),
            cfg,
            running: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(paused),
            vram_blocked: AtomicBool::new(false),
            stop_claiming: CancellationToken::new(),
            releasing: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            out_of_memory: AtomicU64::new(0),
            fatal,
        });
        let handle = tokio::spawn(dispatch(inner.clone()));
        let heartbeat = tokio::spawn(heartbeat_loop(inner.clone()));
        Ok(Self {
            inner,
            dispatcher: Arc::new(Mutex::new(Some(handle))),
            heartbeat: Arc::new(heartbeat.abort_handle()),
        })
    }

    /// Sets how many jobs may run at once (the adaptive controller's output).
    pub fn set_target(&self, n: usize) {
        let n = n.clamp(1, self.inner.cfg.max_concurrency.max(1));
        if self.inner.target.swap(n, Ordering::SeqCst) < n {
            self.inner.wakeup.wake();
        }
    }

    /// Pauses or resumes claiming (the caller persists the switch).
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.inner.wakeup.wake();
        }
    }

    /// Pauses claiming while memory is exhausted even at concurrency 1 (the adaptive
    /// controller's `vram_blocked` state), independent of the user's pause.
    pub fn set_vram_blocked(&self, blocked: bool) {
        self.inner.vram_blocked.store(blocked, Ordering::SeqCst);
        if !blocked {
            self.inner.wakeup.wake();
        }
    }

    /// Signals a running job of this process to stop at its next token.
    pub fn cancel_running(&self, id: Uuid) -> bool {
        let running = lock(&self.inner.running);
        match running.get(&id) {
            Some(r) => {
                r.flags.user_cancel.store(true, Ordering::SeqCst);
                r.flags.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Routes the text of job `id` to `tx` while it runs (register before it starts).
    pub fn subscribe(&self, id: Uuid, tx: mpsc::UnboundedSender<String>) {
        lock(&self.inner.streams).insert(id, tx);
    }

    /// Current figures.
    pub fn stats(&self) -> PoolStats {
        let busy = lock(&self.inner.running).len();
        let target = self.inner.target.load(Ordering::SeqCst);
        PoolStats {
            busy,
            idle: target.saturating_sub(busy),
            target,
            paused: self.inner.paused.load(Ordering::SeqCst),
            completed: self.inner.completed.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
            out_of_memory: self.inner.out_of_memory.load(Ordering::Relaxed),
            vram_blocked: self.inner.vram_blocked.load(Ordering::SeqCst),
            max: self.inner.cfg.max_concurrency.max(1),
        }
    }

    /// Resolves with a reason when a device fault makes the process unusable.
    pub fn fatal_errors(&self) -> watch::Receiver<Option<String>> {
        self.inner.fatal.subscribe()
    }

    /// Stops claiming, gives running jobs the grace period, then cancels and releases
    /// what still runs so another start picks it up without counting an attempt.
    pub async fn shutdown(&self) {
        self.inner.stop_claiming.cancel();
        self.inner.wakeup.wake();
        let handle = lock(&self.dispatcher).take();
        if let Some(h) = handle {
            let _ = h.await;
        }
        let deadline = Instant::now() + self.inner.cfg.shutdown_grace;
        while !lock(&self.inner.running).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = lock(&self.inner.running).len();
        if left > 0 {
            info!(jobs = left, "grace period over; releasing running jobs");
            self.inner.releasing.store(true, Ordering::SeqCst);
            for r in lock(&self.inner.running).values() {
                r.flags.cancel.store(true, Ordering::SeqCst);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !lock(&self.inner.running).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.heartbeat.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn dispatch(inner: Arc<Inner>) {
    let housekeeping_every = (inner.cfg.lease / 2).max(inner.cfg.poll_interval);
    let mut last_housekeeping = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut finished_at_checkpoint = 0u64;
    let mut failures = 0u32;
    loop {
        if inner.stop_claiming.is_cancelled() {
            break;
        }
        if last_housekeeping.elapsed() >= housekeeping_every {
            last_housekeeping = Instant::now();
            match inner.store.rescue(false).await {
                Ok(n) if n > 0 => warn!(jobs = n, "rescued jobs whose lease expired"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "lease rescue failed"),
            }
            let finished =
                inner.completed.load(Ordering::Relaxed) + inner.failed.load(Ordering::Relaxed);
            if finished != finished_at_checkpoint
                && last_checkpoint.elapsed() >= Duration::from_secs(60)
            {
                finished_at_checkpoint = finished;
                last_checkpoint = Instant::now();
                if let Err(e) = inner.store.checkpoint().await {
                    warn!(error = %e, "WAL checkpoint failed");
                }
            }
        }
        let busy = lock(&inner.running).len();
        let free = inner.target.load(Ordering::SeqCst).saturating_sub(busy);
        let paused =
            inner.paused.load(Ordering::SeqCst) || inner.vram_blocked.load(Ordering::SeqCst);
        let mut claimed = 0;
        if free > 0 && !paused {
            match inner
                .store
                .claim(&inner.cfg.owner, free, inner.cfg.lease)
                .await
            {
                Ok(jobs) => {
                    failures = 0;
                    claimed = jobs.len();
                    for job in jobs {
                        start_job(&inner, job);
                    }
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    error!(error = %e, retry_in_ms = wait.as_millis() as u64, "claiming jobs failed");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
        }
        if claimed > 0 && claimed == free {
            continue;
        }
        let mut sleep_for = inner.cfg.poll_interval;
        if free > claimed && !paused {
            match inner.store.next_run_at().await {
                Ok(Some(at)) => {
                    let wait = at - now_ms();
                    if wait <= 0 {
                        continue;
                    }
                    sleep_for = sleep_for.min(Duration::from_millis(wait as u64));
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "reading the next run time failed"),
            }
        }
        tokio::select! {
            _ = inner.wakeup.wait() => {}
            _ = tokio::time::sleep(sleep_for) => {}
            _ = inner.stop_claiming.cancelled() => break,
        }
    }
}

/// Registers a job as running and returns its flags.
fn register(inner: &Inner, job: &Job) -> Flags {
    let flags = Flags {
        cancel: Arc::new(AtomicBool::new(job.cancel_requested)),
        user_cancel: Arc::new(AtomicBool::new(job.cancel_requested)),
        lost: Arc::new(AtomicBool::new(false)),
    };
    lock(&inner.running).insert(
        job.id,
        Running {
            attempt: job.attempt,
            flags: flags.clone(),
        },
    );
    flags
}

/// Runs a job in its own slot; the slot keeps running the next job it claimed in the
/// same commit that finished the previous one, until none is left or it must shrink.
fn start_job(inner: &Arc<Inner>, job: Job) {
    let flags = register(inner, &job);
    let inner = inner.clone();
    tokio::spawn(async move {
        let (mut job, mut flags) = (job, flags);
        loop {
            let span =
                info_span!("job", id = %job.id, task = job.task.as_str(), attempt = job.attempt);
            let next = run_job(&inner, job.clone(), flags.clone())
                .instrument(span)
                .await;
            if let Some(next) = &next {
                flags = register(&inner, next);
            }
            lock(&inner.running).remove(&job.id);
            lock(&inner.streams).remove(&job.id);
            match next {
                Some(n) => job = n,
                None => break,
            }
        }
        inner.wakeup.wake();
    });
}

/// Whether a slot that just finished may claim another job.
fn slot_may_continue(inner: &Inner) -> bool {
    !inner.stop_claiming.is_cancelled()
        && !inner.paused.load(Ordering::SeqCst)
        && !inner.vram_blocked.load(Ordering::SeqCst)
        && lock(&inner.running).len() <= inner.target.load(Ordering::SeqCst)
}

async fn run_job(inner: &Arc<Inner>, job: Job, flags: Flags) -> Option<Job> {
    let Flags {
        cancel,
        user_cancel,
        lost,
    } = flags;
    let started = Instant::now();
    let stream = lock(&inner.streams).get(&job.id).cloned();
    let ctl = JobControl {
        cancel: cancel.clone(),
        stream,
    };
    let handler = inner.handler.clone();
    let outcome = if handler.blocks() {
        let work_job = job.clone();
        tokio::task::spawn_blocking(move || handler.handle(&work_job, &ctl)).await
    } else {
        Ok(handler.handle(&job, &ctl))
    };
    if lost.load(Ordering::SeqCst) {
        warn!("lease lost while running (rescued by another worker or changed); result dropped");
        return None;
    }
    let finish = match outcome {
        Ok(Ok(out)) => {
            info!(
                seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
                "job succeeded"
            );
            Finish::Succeeded {
                model: out.model,
                output: out.output,
            }
        }
        Ok(Err(JobFailure::Permanent(e))) => {
            warn!(code = %e.code, message = %e.message, "job failed permanently");
            Finish::Failed(e)
        }
        Ok(Err(JobFailure::Transient(e))) => {
            let delay = inner.cfg.retry.delay_after(job.attempt);
            warn!(code = %e.code, message = %e.message, retry_in_s = delay.as_secs_f64(), "job failed; will retry if attempts remain");
            Finish::Retry {
                run_at: now_ms() + delay.as_millis() as i64,
                error: e,
            }
        }
        Ok(Err(JobFailure::OutOfMemory(e))) => {
            inner.out_of_memory.fetch_add(1, Ordering::Relaxed);
            warn!(message = %e.message, "out of memory; requeued without counting the attempt");
            Finish::OutOfMemory {
                max_oom: inner.cfg.max_oom_retries,
                error: e,
            }
        }
        Ok(Err(JobFailure::Cancelled)) => {
            if user_cancel.load(Ordering::SeqCst) || !inner.releasing.load(Ordering::SeqCst) {
                info!("job cancelled");
                Finish::Cancelled
            } else {
                info!("job released for the next start");
                Finish::Released
            }
        }
        Ok(Err(JobFailure::DeviceFault(e))) => {
            error!(message = %e.message, "unrecoverable device fault; releasing the job and stopping");
            let _ = inner.fatal.send(Some(e.message.clone()));
            inner.stop_claiming.cancel();
            Finish::Released
        }
        Err(join) => {
            let message = if join.is_panic() {
                "the worker panicked while running this job"
            } else {
                "the worker task was aborted"
            };
            error!(message, "job attempt crashed");
            Finish::Retry {
                run_at: now_ms() + inner.cfg.retry.delay_after(job.attempt).as_millis() as i64,
                error: JobErrorInfo {
                    code: "worker_crashed".into(),
                    message: message.into(),
                },
            }
        }
    };
    match &finish {
        Finish::Succeeded { .. } => inner.completed.fetch_add(1, Ordering::Relaxed),
        Finish::Failed(_) => inner.failed.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let op = FinishOp {
        id: job.id,
        owner: inner.cfg.owner.clone(),
        attempt: job.attempt,
        finish,
        claim_next: slot_may_continue(inner).then_some(inner.cfg.lease),
    };
    let next = write_finish(inner, op).await;
    inner.events.publish(job.id);
    next
}

/// Writes the outcome, retrying while the disk is full or the database busy; if it
/// never succeeds the lease runs out and the rescuer returns the job to the queue.
/// Returns the next job claimed in the same commit, if any.
async fn write_finish(inner: &Arc<Inner>, op: FinishOp) -> Option<Job> {
    // Keep trying well past the lease: the write is guarded by owner and attempt, so
    // after a database outage it still lands unless another worker took the job over.
    let deadline = Instant::now() + inner.cfg.lease * 4;
    let mut wait = Duration::from_millis(50);
    loop {
        match inner.store.finish(op.clone()).await {
            Ok(outcome) => {
                if !outcome.applied {
                    warn!("outcome refused: the lease was no longer held");
                }
                return outcome.next;
            }
            Err(e) if Instant::now() < deadline => {
                warn!(error = %e, "writing the outcome failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                error!(error = %e, "could not write the outcome; the lease will expire and the job will run again");
                return None;
            }
        }
    }
}

/// Renews every lease of this process in one statement every third of a lease, and
/// flags jobs whose lease was lost or whose cancellation was requested. Runs on the
/// async runtime, so inference on blocking threads cannot delay it; idle, it is silent.
async fn heartbeat_loop(inner: Arc<Inner>) {
    let every = inner.cfg.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        // Jobs registered now were claimed in commits before the statement below, so
        // each of them must be in its answer unless its lease was lost.
        let before: Vec<(Uuid, i64)> = lock(&inner.running)
            .iter()
            .map(|(id, r)| (*id, r.attempt))
            .collect();
        if before.is_empty() {
            continue;
        }
        let held = match inner
            .store
            .heartbeat(&inner.cfg.owner, inner.cfg.lease)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "heartbeat failed");
                continue;
            }
        };
        let running = lock(&inner.running);
        for (id, attempt) in before {
            let Some(r) = running.get(&id).filter(|r| r.attempt == attempt) else {
                continue;
            };
            match held.iter().find(|h| h.id == id && h.attempt == attempt) {
                Some(h) if h.cancel => {
                    r.flags.user_cancel.store(true, Ordering::SeqCst);
                    r.flags.cancel.store(true, Ordering::SeqCst);
                }
                Some(_) => {}
                None => {
                    r.flags.lost.store(true, Ordering::SeqCst);
                    r.flags.cancel.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

//! The live feed behind the dashboard (`GET /v1/events`, Server-Sent Events). One task
//! per server samples the queue once a second and broadcasts what changed to every
//! open stream, so the database work is the same for one page or fifty and never
//! grows with the number of jobs: an open page costs no query per job or per client.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use super::jobs::{JobView, eta_seconds, rfc3339};
use super::{AppState, Stats};
use crate::queue::{BatchSummary, Job, JobResult, JobState, StateCounts, now_ms};
use crate::workers::vram::{HostMemoryProbe, VramProbe};

/// How often the hub samples the queue.
pub const TICK: Duration = Duration::from_secs(1);
/// Samples kept for a page that opens later (10 minutes at one a second).
const HISTORY: usize = 600;
/// Finished jobs are re-read this far back each tick, so a completion committed a
/// little after a later-stamped one is not missed (it is sent once: see `seen`).
const LAG_MS: i64 = 3_000;
/// Most finished jobs one tick sends; the rest follow on the next tick.
const MAX_JOBS_PER_TICK: usize = 2_000;
/// Batches listed with their progress.
const BATCHES: i64 = 8;

/// One point of the dashboard's charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Unix milliseconds.
    pub t: i64,
    /// Jobs running.
    pub busy: usize,
    /// Concurrency target (decode batch size).
    pub target: usize,
    /// Memory in use, MiB (VRAM with a GPU probe, host memory otherwise).
    pub used_mib: Option<u64>,
    /// Memory in total, MiB.
    pub total_mib: Option<u64>,
    /// Jobs succeeded per second over the last minute.
    pub images_per_second: f64,
}

/// A batch's progress as the feed shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BatchProgress {
    /// Batch id.
    pub id: Uuid,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Jobs in it.
    pub total: i64,
    /// Jobs per state.
    pub counts: StateCounts,
    /// Jobs of it succeeded per second over the last minute (as the feed saw them).
    pub images_per_second: f64,
    /// Seconds until its pending jobs are done at that rate.
    pub eta_seconds: Option<f64>,
}

/// What every tick carries.
#[derive(Debug, Serialize)]
struct Tick<'a> {
    seq: u64,
    t: i64,
    stats: &'a Stats,
    sample: Sample,
    /// Jobs this process finished per second since it started.
    images_per_second_since_start: f64,
    /// Seconds until what is queued is done at the last minute's rate.
    eta_seconds: Option<f64>,
    memory_kind: &'static str,
    batches: &'a [BatchProgress],
}

/// The hub's own work, for `/v1/stats` and the tests that bound it.
#[derive(Debug, Clone, Copy, Default, Serialize, schemars::JsonSchema)]
pub struct FeedStats {
    /// Streams open now.
    pub subscribers: usize,
    /// Ticks run since start.
    pub ticks: u64,
    /// Database queries those ticks ran.
    pub queries: u64,
    /// Job events sent (each finished job once per stream).
    pub job_events: u64,
}

/// A frame sent to every stream: the SSE event name and its JSON data.
#[derive(Debug)]
struct Frame {
    name: &'static str,
    data: String,
}

#[derive(Default)]
struct Shared {
    running: bool,
    history: VecDeque<Sample>,
    last_tick: Option<Arc<Frame>>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Frame>>,
    shared: Mutex<Shared>,
    stop: CancellationToken,
    ticks: AtomicU64,
    queries: AtomicU64,
    job_events: AtomicU64,
}

/// Fans the queue's changes out to the open `/v1/events` streams. Its sampling task
/// runs only while at least one stream is open.
#[derive(Clone)]
pub struct EventHub(Arc<Inner>);

impl EventHub {
    /// A hub whose streams end when `stop` is cancelled (server shutdown).
    pub fn new(stop: CancellationToken) -> Self {
        Self(Arc::new(Inner {
            tx: broadcast::channel(256).0,
            shared: Mutex::new(Shared::default()),
            stop,
            ticks: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            job_events: AtomicU64::new(0),
        }))
    }

    /// The hub's figures.
    pub fn stats(&self) -> FeedStats {
        FeedStats {
            subscribers: self.0.tx.receiver_count(),
            ticks: self.0.ticks.load(Ordering::Relaxed),
            queries: self.0.queries.load(Ordering::Relaxed),
            job_events: self.0.job_events.load(Ordering::Relaxed),
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a stream: the `hello` frame (history and the last tick) and a receiver of
    /// the frames to come. Starts the sampling task if it is not running.
    fn subscribe(&self, state: &AppState) -> (Frame, broadcast::Receiver<Arc<Frame>>) {
        let mut shared = self.shared();
        let rx = self.0.tx.subscribe();
        if !shared.running {
            shared.running = true;
            let hub = self.clone();
            let state = state.clone();
            tokio::spawn(async move { hub.run(state).await });
        }
        let history: Vec<Sample> = shared.history.iter().copied().collect();
        let last: Option<serde_json::Value> = shared
            .last_tick
            .as_ref()
            .and_then(|f| serde_json::from_str(&f.data).ok());
        let data = serde_json::json!({"history": history, "tick": last, "tick_ms": TICK.as_millis() as u64});
        (
            Frame {
                name: "hello",
                data: data.to_string(),
            },
            rx,
        )
    }

    /// The sampling loop: one tick a second until no stream is open or the server stops.
    async fn run(self, state: AppState) {
        let mut feed = JobFeed::new(now_ms());
        let mut rates = BatchRates::default();
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = self.0.stop.cancelled() => break,
            }
            {
                let mut shared = self.shared();
                if self.0.tx.receiver_count() == 0 {
                    shared.running = false;
                    return;
                }
            }
            if let Err(e) = self.tick(&state, &mut feed, &mut rates).await {
                debug!(code = e.code, error = %e.message, "dashboard feed tick failed; trying again next tick");
            }
        }
        self.shared().running = false;
    }

    async fn tick(
        &self,
        state: &AppState,
        feed: &mut JobFeed,
        rates: &mut BatchRates,
    ) -> Result<(), super::ApiError> {
        let seq = self.0.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        // Finished jobs first, so the counts sent after them already include them.
        let (jobs, queries) = feed.poll(state).await?;
        self.0.queries.fetch_add(queries, Ordering::Relaxed);
        if !jobs.is_empty() {
            let n = jobs.len() as u64;
            let data = serde_json::json!({"seq": seq, "jobs": jobs}).to_string();
            let sent = self.0.tx.send(Arc::new(Frame { name: "jobs", data }));
            self.0
                .job_events
                .fetch_add(n * sent.unwrap_or(0) as u64, Ordering::Relaxed);
        }
        let stats = super::collect_stats(state).await?;
        let batches = state.store.recent_batches(BATCHES).await?;
        self.0
            .queries
            .fetch_add(super::STATS_QUERIES + 1, Ordering::Relaxed);
        let batches = rates.update(now, batches);
        let (memory_kind, reading) = match state.governor.get() {
            Some(g) => {
                let snap = g.snapshot();
                (if snap.gpu { "gpu" } else { "host" }, snap.last)
            }
            None => ("host", HostMemoryProbe.read()),
        };
        let workers = stats.workers.as_ref();
        let sample = Sample {
            t: now,
            busy: workers.map_or(0, |w| w.busy),
            target: workers.map_or(0, |w| w.target),
            used_mib: reading.map(|r| r.used >> 20),
            total_mib: reading.map(|r| r.total >> 20),
            images_per_second: stats.images_per_second,
        };
        let pending = stats.jobs.pending();
        let tick = Tick {
            seq,
            t: now,
            stats: &stats,
            sample,
            images_per_second_since_start: workers
                .map_or(0.0, |w| w.completed as f64 / stats.uptime_seconds.max(1.0)),
            eta_seconds: eta_seconds(pending, stats.images_per_second),
            memory_kind,
            batches: &batches,
        };
        let frame = Arc::new(Frame {
            name: "tick",
            data: serde_json::to_string(&tick).unwrap_or_default(),
        });
        {
            let mut shared = self.shared();
            if shared.history.len() == HISTORY {
                shared.history.pop_front();
            }
            shared.history.push_back(sample);
            shared.last_tick = Some(frame.clone());
        }
        let _ = self.0.tx.send(frame);
        Ok(())
    }
}

/// A finished job as the feed sends it: the API's job view (with its result).
#[derive(Debug, Serialize)]
struct JobEvent {
    #[serde(flatten)]
    job: JobView,
    /// Terminal time, Unix milliseconds (orders events on the page).
    finished_ms: i64,
}

/// Follows `finished_at`: each tick reads the jobs finished since the last one, and
/// the last `LAG_MS` again, sending each (job, finish time) once.
struct JobFeed {
    /// Latest finish time seen.
    high: i64,
    /// (job, finish time) pairs sent within the re-read window.
    seen: HashMap<Uuid, i64>,
}

impl JobFeed {
    fn new(start_ms: i64) -> Self {
        Self {
            high: start_ms,
            seen: HashMap::new(),
        }
    }

    async fn poll(&mut self, state: &AppState) -> Result<(Vec<JobEvent>, u64), super::ApiError> {
        let mut out = Vec::new();
        let mut queries = 0;
        let mut cursor = (self.high - LAG_MS, None);
        loop {
            let page = state.store.finished_after(cursor.0, cursor.1, 500).await?;
            queries += 1;
            let full = page.len() == 500;
            for (job, result) in page {
                let Some(at) = job.finished_at else { continue };
                cursor = (at, Some(job.id));
                if self.seen.get(&job.id) == Some(&at) {
                    continue;
                }
                self.seen.insert(job.id, at);
                self.high = self.high.max(at);
                out.push(event(job, result, at));
            }
            if !full || out.len() >= MAX_JOBS_PER_TICK {
                break;
            }
        }
        let horizon = self.high - 2 * LAG_MS;
        self.seen.retain(|_, at| *at >= horizon);
        Ok((out, queries))
    }
}

fn event(job: Job, result: Option<JobResult>, finished_ms: i64) -> JobEvent {
    let result = if job.state == JobState::Succeeded {
        result
    } else {
        None
    };
    JobEvent {
        job: super::jobs::view_with(job, result),
        finished_ms,
    }
}

/// Per-batch succeeded counts over the last minute, for each batch's rate and ETA.
#[derive(Default)]
struct BatchRates {
    seen: HashMap<Uuid, VecDeque<(i64, i64)>>,
}

impl BatchRates {
    fn update(&mut self, now: i64, batches: Vec<BatchSummary>) -> Vec<BatchProgress> {
        self.seen
            .retain(|id, _| batches.iter().any(|b| b.id == *id));
        batches
            .into_iter()
            .map(|b| {
                let points = self.seen.entry(b.id).or_default();
                points.push_back((now, b.counts.succeeded));
                while points.front().is_some_and(|(t, _)| now - t > 60_000) {
                    points.pop_front();
                }
                let rate = match (points.front(), points.back()) {
                    (Some(a), Some(z)) if z.0 > a.0 => {
                        (z.1 - a.1) as f64 / ((z.0 - a.0) as f64 / 1000.0)
                    }
                    _ => 0.0,
                };
                let pending = b.counts.pending();
                BatchProgress {
                    id: b.id,
                    created_at: rfc3339(b.created_at),
                    total: b.total,
                    eta_seconds: eta_seconds(pending, rate),
                    images_per_second: rate,
                    counts: b.counts,
                }
            })
            .collect()
    }
}

/// `GET /v1/events`: Server-Sent Events for the dashboard. `hello` (the last ten
/// minutes of samples and the last tick), then a `tick` a second (counts, rates,
/// workers, memory, the controller's decisions, batches) and `jobs` (jobs finished
/// since the last tick, with results). `resync` tells a client that fell behind
/// to reload its lists.
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let hub = state.hub.clone();
    let (hello, rx) = hub.subscribe(&state);
    let stop = hub.0.stop.clone();
    let first = Some(Event::default().event(hello.name).data(hello.data));
    let stream = futures::stream::unfold((first, rx, stop), |(first, mut rx, stop)| async move {
        if let Some(ev) = first {
            return Some((Ok(ev), (None, rx, stop)));
        }
        let ev = tokio::select! {
            r = rx.recv() => match r {
                Ok(f) => Event::default().event(f.name).data(f.data.as_str()),
                Err(broadcast::error::RecvError::Lagged(n)) => Event::default()
                    .event("resync")
                    .data(serde_json::json!({"missed": n}).to_string()),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = stop.cancelled() => return None,
        };
        Some((Ok(ev), (None, rx, stop)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

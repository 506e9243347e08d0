//! Queue machinery benchmark (run by `scripts/bench-queue`): batch enqueue rate,
//! claim→complete throughput with a no-op handler at several concurrencies and both
//! durability levels, insert-to-claim pickup latency, and queries issued while idle.
//! Prints figures; asserts nothing about time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use captiond::queue::{
    Durability, ImageSource, Job, JobEvents, NewJob, Store, StoreOptions, TaskKind, Wakeup,
};
use captiond::workers::{
    HandlerOutput, JobControl, JobFailure, JobHandler, PoolConfig, WorkerPool,
};
use tracing_subscriber::layer::SubscriberExt;

/// Succeeds at once, recording when each job started.
struct Noop {
    started: Mutex<Vec<Instant>>,
}

impl JobHandler for Noop {
    fn handle(&self, _job: &Job, _ctl: &JobControl) -> Result<HandlerOutput, JobFailure> {
        if let Ok(mut s) = self.started.lock() {
            s.push(Instant::now());
        }
        Ok(HandlerOutput {
            model: "noop".into(),
            output: serde_json::json!({"caption": ""}),
        })
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// Counts sqlx statement log events, i.e. queries sent to SQLite.
struct QueryCounter(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QueryCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target().starts_with("sqlx::query") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn job(i: usize) -> NewJob {
    NewJob {
        task: TaskKind::Caption,
        params: serde_json::json!({"length": "short"}),
        source: ImageSource::Path(format!("/photos/{i:07}.jpg")),
        priority: 100,
        max_attempts: 5,
        idempotency_key: None,
    }
}

async fn open(dir: &std::path::Path, durability: Durability) -> Store {
    let opts = StoreOptions {
        durability,
        ..StoreOptions::default()
    };
    Store::open(&dir.join("bench.db"), &opts)
        .await
        .expect("store opens")
}

fn pool_config(concurrency: usize) -> PoolConfig {
    PoolConfig {
        max_concurrency: concurrency,
        poll_interval: Duration::from_secs(1),
        ..PoolConfig::default()
    }
}

async fn enqueue_rate(durability: Durability) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), durability).await;
    let jobs: Vec<NewJob> = (0..10_000).map(job).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        store.insert_batch(&jobs).await.unwrap();
        best = best.max(jobs.len() as f64 / t.elapsed().as_secs_f64());
    }
    store.close().await;
    best
}

async fn throughput(durability: Durability, concurrency: usize, n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), durability).await;
    let jobs: Vec<NewJob> = (0..n).map(job).collect();
    for chunk in jobs.chunks(10_000) {
        store.insert_batch(chunk).await.unwrap();
    }
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    // Completions are counted from the pool's events (sent after each commit), not by
    // polling the table: a COUNT over n rows every few ms would compete for the CPU.
    let events = JobEvents::default();
    let mut done_rx = events.subscribe();
    let t = Instant::now();
    let pool = WorkerPool::start(
        store.clone(),
        handler,
        Wakeup::default(),
        events,
        pool_config(concurrency),
    )
    .await
    .unwrap();
    // Drained every 2 ms rather than woken per job, so the bench costs the pool nothing.
    let mut done = 0usize;
    while done < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
        loop {
            match done_rx.try_recv() {
                Ok(_) => done += 1,
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(k)) => done += k as usize,
                Err(_) => break,
            }
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(store.counts(None).await.unwrap().succeeded as usize, n);
    pool.shutdown().await;
    store.close().await;
    rate
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn pickup_latency(durability: Durability) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), durability).await;
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    let wakeup = Wakeup::default();
    let events = JobEvents::default();
    let pool = WorkerPool::start(
        store.clone(),
        handler.clone(),
        wakeup.clone(),
        events.clone(),
        pool_config(4),
    )
    .await
    .unwrap();
    let mut samples = Vec::new();
    for i in 0..300 {
        let mut rx = events.subscribe();
        let (created, _) = store.insert_job(&job(i)).await.unwrap();
        let inserted = Instant::now();
        wakeup.wake();
        while rx.recv().await.ok() != Some(created.id) {}
        let started = *handler.started.lock().unwrap().last().unwrap();
        samples.push(started.duration_since(inserted).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pool.shutdown().await;
    store.close().await;
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

async fn idle_queries(counter: &AtomicU64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Durability::Full).await;
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    let cfg = PoolConfig {
        poll_interval: Duration::from_secs(5),
        ..pool_config(4)
    };
    let pool = WorkerPool::start(
        store.clone(),
        handler,
        Wakeup::default(),
        JobEvents::default(),
        cfg,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = counter.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let queries = counter.load(Ordering::Relaxed) - before;
    pool.shutdown().await;
    store.close().await;
    (queries, 10 / 5)
}

#[tokio::main]
async fn main() {
    let counter = Arc::new(AtomicU64::new(0));
    // Statement logging costs time per query, so it is switched on only while the idle
    // server's queries are counted.
    let (filter, logging) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::filter::Targets::new());
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(QueryCounter(counter.clone()));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 20_000 };
    // `--concurrency N` measures only claim→complete at N (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--concurrency")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    if let Some(c) = only {
        let (f, nn) = (
            throughput(Durability::Full, c, n).await,
            throughput(Durability::Normal, c, n).await,
        );
        println!("claim→complete, jobs/s, concurrency {c}: FULL {f:.0}, NORMAL {nn:.0}");
        return;
    }

    println!("captiond queue benchmark (no-op handler, SQLite file in a temp dir)");
    println!("{:<44} {:>12} {:>12}", "figure", "FULL", "NORMAL");
    let (ef, en) = (
        enqueue_rate(Durability::Full).await,
        enqueue_rate(Durability::Normal).await,
    );
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "batch enqueue, jobs/s (10k per transaction)", ef, en
    );
    for c in [1, 4, 16] {
        let (f, nn) = (
            throughput(Durability::Full, c, n).await,
            throughput(Durability::Normal, c, n).await,
        );
        println!(
            "{:<44} {:>12.0} {:>12.0}",
            format!("claim→complete, jobs/s, concurrency {c}"),
            f,
            nn
        );
    }
    let (pf50, pf99) = pickup_latency(Durability::Full).await;
    let (pn50, pn99) = pickup_latency(Durability::Normal).await;
    println!(
        "{:<44} {:>12.2} {:>12.2}",
        "insert→claim pickup p50, ms", pf50, pn50
    );
    println!(
        "{:<44} {:>12.2} {:>12.2}",
        "insert→claim pickup p99, ms", pf99, pn99
    );
    logging
        .reload(
            tracing_subscriber::filter::Targets::new()
                .with_target("sqlx::query", tracing::Level::TRACE),
        )
        .unwrap();
    let (q, polls) = idle_queries(&counter).await;
    println!(
        "idle server, 10 s, fallback poll 5 s: {q} queries ({polls} polls; queries between polls: {})",
        q.saturating_sub(polls * 2)
    );
}

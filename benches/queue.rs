//! Queue machinery benchmark (run by `scripts/bench-queue`): batch enqueue rate,
//! claim→complete throughput with a no-op handler at several concurrencies and both
//! durability levels, insert-to-claim pickup latency, and queries issued while idle.
//! `--backend postgres` measures the same on a throwaway PostgreSQL cluster
//! (`synchronous_commit=on`, fsync on), with several independent pools sharing it.
//! Prints figures; asserts nothing about time.

#[path = "../tests/common/pg.rs"]
mod pg;

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
    let rate = throughput_on(std::slice::from_ref(&store), concurrency, n).await;
    store.close().await;
    rate
}

/// Claim→complete of `n` no-op jobs by one pool per store (each its own connections,
/// finisher and lease owner: how separate processes share a database), each pool at
/// `concurrency`.
async fn throughput_on(stores: &[Store], concurrency: usize, n: usize) -> f64 {
    let store = &stores[0];
    let jobs: Vec<NewJob> = (0..n).map(job).collect();
    for chunk in jobs.chunks(10_000) {
        store.insert_batch(chunk).await.unwrap();
    }
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    // Completions are counted from the pools' events (sent after each commit), not by
    // polling the table: a COUNT over n rows every few ms would compete for the CPU.
    let events = JobEvents::default();
    let mut done_rx = events.subscribe();
    let t = Instant::now();
    let mut pools = Vec::new();
    for s in stores {
        let pool = WorkerPool::start(
            s.clone(),
            handler.clone(),
            Wakeup::default(),
            events.clone(),
            pool_config(concurrency),
        )
        .await
        .unwrap();
        pools.push(pool);
    }
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
    for pool in pools {
        pool.shutdown().await;
    }
    let counts = store.counts(None).await.unwrap();
    assert_eq!(counts.succeeded as usize, n, "{counts:?}");
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

/// A fresh database on the cluster, opened `pools` times (one store per "process").
async fn pg_stores(cluster: &pg::PgCluster, name: &str, pools: usize) -> Vec<Store> {
    let url = cluster.fresh_database(name).await;
    let mut out = Vec::new();
    for _ in 0..pools {
        out.push(
            Store::connect_postgres(&url, &StoreOptions::default())
                .await
                .expect("PostgreSQL store"),
        );
    }
    out
}

async fn close_all(stores: Vec<Store>) {
    for s in stores {
        s.close().await;
    }
}

/// Pickup across "processes": jobs inserted through one store (which NOTIFYs) and
/// claimed by a pool on another store, woken by its LISTEN connection.
async fn pg_pickup(cluster: &pg::PgCluster) -> (f64, f64) {
    let stores = pg_stores(cluster, "pickup", 2).await;
    let (inserter, worker) = (stores[0].clone(), stores[1].clone());
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    let wakeup = Wakeup::default();
    let stop = tokio_util::sync::CancellationToken::new();
    assert!(worker.spawn_listener(wakeup.clone(), stop.clone(), |_| {}));
    let events = JobEvents::default();
    let pool = WorkerPool::start(
        worker.clone(),
        handler.clone(),
        wakeup,
        events.clone(),
        pool_config(4),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::new();
    for i in 0..300 {
        let mut rx = events.subscribe();
        let before = Instant::now();
        let (created, _) = inserter.insert_job(&job(i)).await.unwrap();
        // The insert commits, then NOTIFYs: time from the commit's return would miss
        // the notification's own trip, so it is measured from the insert call.
        while rx.recv().await.ok() != Some(created.id) {}
        let started = *handler.started.lock().unwrap().last().unwrap();
        samples.push(started.duration_since(before).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    pool.shutdown().await;
    close_all(stores).await;
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

async fn pg_idle_queries(cluster: &pg::PgCluster, counter: &AtomicU64) -> (u64, u64) {
    let stores = pg_stores(cluster, "idle", 1).await;
    let store = stores[0].clone();
    let wakeup = Wakeup::default();
    let stop = tokio_util::sync::CancellationToken::new();
    store.spawn_listener(wakeup.clone(), stop.clone(), |_| {});
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    let cfg = PoolConfig {
        poll_interval: Duration::from_secs(5),
        ..pool_config(4)
    };
    let pool = WorkerPool::start(store.clone(), handler, wakeup, JobEvents::default(), cfg)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counter.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let queries = counter.load(Ordering::Relaxed) - before;
    stop.cancel();
    pool.shutdown().await;
    close_all(stores).await;
    (queries, 10 / 5)
}

async fn postgres_suite(n: usize, counter: &AtomicU64, logging: impl Fn(bool)) {
    let Some(cluster) = pg::PgCluster::start_with(&[
        &std::env::var("BENCH_PG_SETTING").unwrap_or("synchronous_commit=on".into())
    ]) else {
        return;
    };
    println!(
        "captiond queue benchmark (no-op handler) on PostgreSQL: a throwaway cluster on this machine, synchronous_commit=on, fsync on"
    );
    let stores = pg_stores(&cluster, "enqueue", 1).await;
    let jobs: Vec<NewJob> = (0..10_000).map(job).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        stores[0].insert_batch(&jobs).await.unwrap();
        best = best.max(jobs.len() as f64 / t.elapsed().as_secs_f64());
    }
    close_all(stores).await;
    println!(
        "{:<52} {:>10.0}",
        "batch enqueue, jobs/s (10k per transaction)", best
    );
    for c in [1, 4, 16] {
        let stores = pg_stores(&cluster, &format!("one{c}"), 1).await;
        let rate = throughput_on(&stores, c, n).await;
        close_all(stores).await;
        println!(
            "{:<52} {:>10.0}",
            format!("claim→complete, jobs/s, 1 pool, concurrency {c}"),
            rate
        );
    }
    for pools in [2, 4] {
        let stores = pg_stores(&cluster, &format!("many{pools}"), pools).await;
        let rate = throughput_on(&stores, 16 / pools, n).await;
        close_all(stores).await;
        println!(
            "{:<52} {:>10.0}",
            format!(
                "claim→complete, jobs/s, {pools} pools × concurrency {}",
                16 / pools
            ),
            rate
        );
    }
    let (p50, p99) = pg_pickup(&cluster).await;
    println!(
        "{:<52} {:>10.2}",
        "pickup across pools (insert → NOTIFY → claim) p50, ms", p50
    );
    println!(
        "{:<52} {:>10.2}",
        "pickup across pools (insert → NOTIFY → claim) p99, ms", p99
    );
    logging(true);
    let (q, polls) = pg_idle_queries(&cluster, counter).await;
    logging(false);
    println!(
        "idle pool with LISTEN, 10 s, fallback poll 5 s: {q} queries ({polls} polls; queries between polls: {})",
        q.saturating_sub(polls * 2)
    );
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
    if args
        .windows(2)
        .any(|w| w[0] == "--backend" && w[1] == "postgres")
    {
        let set_logging = |on: bool| {
            let targets = if on {
                tracing_subscriber::filter::Targets::new()
                    .with_target("sqlx::query", tracing::Level::TRACE)
            } else {
                tracing_subscriber::filter::Targets::new()
            };
            logging.reload(targets).unwrap();
        };
        postgres_suite(n, &counter, set_logging).await;
        return;
    }
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

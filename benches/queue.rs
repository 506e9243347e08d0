//! Queue machinery benchmark (run by `scripts/bench-queue`): batch enqueue rate,
//! claim→complete throughput with a no-op handler at several concurrencies and both
//! durability levels, insert-to-claim pickup latency, and queries issued while idle.
//! `--backend postgres` measures the same on a throwaway PostgreSQL cluster
//! (`synchronous_commit=on`, fsync on), with the workers in separate processes (this
//! executable re-run with `--pg-child`), as several hosts share one queue.
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
    fn handle(&self, job: &Job, _ctl: &JobControl) -> Result<HandlerOutput, JobFailure> {
        if let Ok(mut s) = self.started.lock() {
            s.push(Instant::now());
        }
        if let Some(tx) = STARTS.get() {
            let _ = tx.send((job.id, unix_ns()));
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

/// In a child process run with `--starts`: where the handler reports each job's start.
static STARTS: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(uuid::Uuid, u128)>> =
    std::sync::OnceLock::new();

/// Wall-clock nanoseconds: comparable between processes on one machine.
fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
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
        done += drain(&mut done_rx);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    for pool in pools {
        pool.shutdown().await;
    }
    let counts = store.counts(None).await.unwrap();
    assert_eq!(counts.succeeded as usize, n, "{counts:?}");
    rate
}

/// How many completions the pool's events announced since the last call (a lagging
/// receiver's skipped events count too).
fn drain(rx: &mut tokio::sync::broadcast::Receiver<uuid::Uuid>) -> usize {
    let mut n = 0;
    loop {
        match rx.try_recv() {
            Ok(_) => n += 1,
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(k)) => n += k as usize,
            Err(_) => return n,
        }
    }
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

/// A benchmark worker process (`--pg-child URL CONCURRENCY [--starts]`): one store and
/// one pool, as a `captiond serve` host has, with its own LISTEN connection. Prints
/// `ready`, starts its pool on `go` from stdin, prints `done N` as completions commit
/// (and `start ID NS` per job with `--starts`), and stops at the end of stdin.
async fn pg_child(url: &str, concurrency: usize, starts: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let store = Store::connect_postgres(url, &StoreOptions::default())
        .await
        .expect("PostgreSQL store");
    let (start_tx, mut start_rx) = tokio::sync::mpsc::unbounded_channel();
    if starts {
        let _ = STARTS.set(start_tx);
    }
    let wakeup = Wakeup::default();
    let stop = tokio_util::sync::CancellationToken::new();
    store.spawn_listener(wakeup.clone(), stop.clone(), |_| {});
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await.unwrap();
    out.flush().await.unwrap();
    if stdin.next_line().await.ok().flatten().as_deref() != Some("go") {
        return;
    }
    let events = JobEvents::default();
    let mut done_rx = events.subscribe();
    let handler = Arc::new(Noop {
        started: Mutex::new(Vec::new()),
    });
    let pool = WorkerPool::start(
        store.clone(),
        handler,
        wakeup,
        events,
        pool_config(concurrency),
    )
    .await
    .unwrap();
    let end = stop.clone();
    tokio::spawn(async move {
        while let Ok(Some(_)) = stdin.next_line().await {}
        end.cancel();
    });
    let (mut done, mut told) = (0usize, 0usize);
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(2)).await;
        done += drain(&mut done_rx);
        let mut lines = String::new();
        while let Ok((id, ns)) = start_rx.try_recv() {
            lines.push_str(&format!("start {id} {ns}\n"));
        }
        if done != told {
            lines.push_str(&format!("done {done}\n"));
            told = done;
        }
        if !lines.is_empty() {
            out.write_all(lines.as_bytes()).await.unwrap();
            out.flush().await.unwrap();
        }
    }
    pool.shutdown().await;
    store.close().await;
}

/// A running `--pg-child`: its stdin (dropped to stop it) and its stdout lines.
struct Child {
    process: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn spawn(url: &str, concurrency: usize, starts: bool) -> Child {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe().expect("own executable");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--pg-child")
            .arg(url)
            .arg(concurrency.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if starts {
            cmd.arg("--starts");
        }
        let mut process = cmd.spawn().expect("benchmark child starts");
        let stdin = process.stdin.take();
        let stdout = process.stdout.take().expect("child stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
        Child {
            process,
            stdin,
            lines,
        }
    }

    async fn go(&mut self) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().expect("child stdin");
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn stop(mut self) {
        self.stdin = None;
        let _ = self.process.wait().await;
    }
}

/// Claim→complete of `n` no-op jobs by `procs` worker processes on one fresh database,
/// each at `concurrency`; timed from `go` to the last completion reported.
async fn pg_throughput(cluster: &pg::PgCluster, procs: usize, concurrency: usize, n: usize) -> f64 {
    let url = cluster
        .fresh_database(&format!("p{procs}c{concurrency}"))
        .await;
    let store = Store::connect_postgres(&url, &StoreOptions::default())
        .await
        .expect("PostgreSQL store");
    let jobs: Vec<NewJob> = (0..n).map(job).collect();
    for chunk in jobs.chunks(10_000) {
        store.insert_batch(chunk).await.unwrap();
    }
    let mut children = Vec::new();
    for _ in 0..procs {
        children.push(Child::spawn(&url, concurrency, false).await);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    for c in &mut children {
        c.go().await;
    }
    // Kept here: closing them (below) is what stops the children.
    let stdins: Vec<_> = children.iter_mut().map(|c| c.stdin.take()).collect();
    let mut readers = Vec::new();
    for (i, mut c) in children.into_iter().enumerate() {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(line)) = c.lines.next_line().await {
                if let Some(k) = line.strip_prefix("done ")
                    && tx.send((i, k.parse::<usize>().unwrap())).is_err()
                {
                    break;
                }
            }
            c
        }));
    }
    drop(tx);
    let mut per_child = vec![0usize; procs];
    while per_child.iter().sum::<usize>() < n {
        let (i, k) = rx.recv().await.expect("children report until done");
        per_child[i] = k;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(rx);
    drop(stdins);
    for r in readers {
        r.await.unwrap().stop().await;
    }
    let counts = store.counts(None).await.unwrap();
    assert_eq!(counts.succeeded as usize, n, "{counts:?}");
    store.close().await;
    rate
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

/// Pickup across processes: jobs inserted through this process's store (which NOTIFYs)
/// and claimed by an idle worker process, woken by its LISTEN connection; from the
/// insert call to the handler's start, on the machine's wall clock.
async fn pg_pickup(cluster: &pg::PgCluster) -> (f64, f64) {
    let url = cluster.fresh_database("pickup").await;
    let inserter = Store::connect_postgres(&url, &StoreOptions::default())
        .await
        .expect("PostgreSQL store");
    let mut child = Child::spawn(&url, 4, true).await;
    child.go().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::new();
    for i in 0..300 {
        let before = unix_ns();
        let (created, _) = inserter.insert_job(&job(i)).await.unwrap();
        let want = format!("start {} ", created.id);
        let started = loop {
            let line = child.lines.next_line().await.unwrap().expect("child runs");
            if let Some(ns) = line.strip_prefix(&want) {
                break ns.parse::<u128>().unwrap();
            }
        };
        samples.push(started.saturating_sub(before) as f64 / 1e6);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.stop().await;
    inserter.close().await;
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

async fn postgres_suite(
    n: usize,
    only: Option<usize>,
    counter: &AtomicU64,
    logging: impl Fn(bool),
) {
    let Some(cluster) = pg::PgCluster::start_with(&[
        &std::env::var("BENCH_PG_SETTING").unwrap_or("synchronous_commit=on".into())
    ]) else {
        return;
    };
    if let Some(c) = only {
        let rate = pg_throughput(&cluster, 1, c, n).await;
        println!("claim→complete on PostgreSQL, jobs/s, 1 process, concurrency {c}: {rate:.0}");
        return;
    }
    println!(
        "captiond queue benchmark (no-op handler) on PostgreSQL: a throwaway cluster on this machine, synchronous_commit=on, fsync on; workers in separate processes"
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
        let rate = pg_throughput(&cluster, 1, c, n).await;
        println!(
            "{:<52} {:>10.0}",
            format!("claim→complete, jobs/s, 1 process, concurrency {c}"),
            rate
        );
    }
    for procs in [2, 4] {
        let rate = pg_throughput(&cluster, procs, 16 / procs, n).await;
        println!(
            "{:<52} {:>10.0}",
            format!(
                "claim→complete, jobs/s, {procs} processes × concurrency {}",
                16 / procs
            ),
            rate
        );
    }
    let (p50, p99) = pg_pickup(&cluster).await;
    println!(
        "{:<52} {:>10.2}",
        "pickup across processes (insert → NOTIFY → start) p50, ms", p50
    );
    println!(
        "{:<52} {:>10.2}",
        "pickup across processes (insert → NOTIFY → start) p99, ms", p99
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
    if let Some(i) = args.iter().position(|a| a == "--pg-child") {
        let concurrency = args[i + 2].parse().expect("--pg-child URL CONCURRENCY");
        pg_child(
            &args[i + 1],
            concurrency,
            args.iter().any(|a| a == "--starts"),
        )
        .await;
        return;
    }
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
        postgres_suite(n, only, &counter, set_logging).await;
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

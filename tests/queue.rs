//! The queue's state machine on both backends — a real SQLite file and a throwaway
//! PostgreSQL cluster — one suite run against each: guarded transitions, leases,
//! heartbeats, retries, out-of-memory requeues, and the worker pool driving them.

mod common;
use common::pg;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use captiond::blobs::{BlobError, BlobStore, SWEEP_GRACE, Swept};
use captiond::queue::{
    CancelOutcome, Finish, FinishOp, ImageSource, Job, JobErrorInfo, JobEvents, JobState, NewJob,
    RetryPolicy, Store, StoreOptions, TaskKind, Wakeup,
};
use captiond::workers::{
    HandlerOutput, JobControl, JobFailure, JobHandler, PoolConfig, WorkerPool,
};

/// A store under test with what keeps it alive, and raw access for test shortcuts.
struct Db {
    store: Store,
    raw: Raw,
}

/// How to reach the database behind the store; the first field keeps it alive.
enum Raw {
    Sqlite(#[allow(dead_code)] tempfile::TempDir, std::path::PathBuf),
    Postgres(#[allow(dead_code)] pg::PgCluster, String),
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store = Store::open(&path, &StoreOptions::default()).await.unwrap();
    Db {
        store,
        raw: Raw::Sqlite(dir, path),
    }
}

async fn postgres() -> Option<Db> {
    let cluster = pg::PgCluster::start()?;
    let url = cluster.fresh_database("queue").await;
    let store = Store::connect_postgres(&url, &StoreOptions::default())
        .await
        .unwrap();
    Some(Db {
        store,
        raw: Raw::Postgres(cluster, url),
    })
}

/// Runs one test body against SQLite and against PostgreSQL (two tests).
macro_rules! on_both_backends {
    ($(#[$attr:meta])* $name:ident) => {
        mod $name {
            $(#[$attr])*
            async fn sqlite() {
                let db = super::sqlite().await;
                super::$name(&db).await;
            }
            $(#[$attr])*
            async fn postgres() {
                let Some(db) = super::postgres().await else { return };
                super::$name(&db).await;
                db.store.close().await;
            }
        }
    };
}

fn new_job(i: usize) -> NewJob {
    NewJob {
        task: TaskKind::Caption,
        params: serde_json::json!({}),
        source: ImageSource::Path(format!("/p/{i}.jpg")),
        priority: 100,
        max_attempts: 3,
        idempotency_key: None,
    }
}

fn err(code: &str) -> JobErrorInfo {
    JobErrorInfo {
        code: code.into(),
        message: format!("{code} happened"),
    }
}

fn op(job: &Job, owner: &str, finish: Finish) -> FinishOp {
    FinishOp {
        id: job.id,
        owner: owner.into(),
        attempt: job.attempt,
        finish,
        claim_next: None,
    }
}

const LEASE: Duration = Duration::from_secs(30);

on_both_backends!(
    #[tokio::test]
    a_worker_whose_lease_was_rescued_cannot_overwrite_the_newer_attempt
);

async fn a_worker_whose_lease_was_rescued_cannot_overwrite_the_newer_attempt(db: &Db) {
    let store = &db.store;
    let (job, _) = store.insert_job(&new_job(1)).await.unwrap();
    let first = store.claim("A", 1, LEASE).await.unwrap().remove(0);
    assert_eq!((first.state, first.attempt), (JobState::Running, 1));
    assert_eq!(store.rescue(true).await.unwrap(), 1);
    let second = store.claim("B", 1, LEASE).await.unwrap().remove(0);
    assert_eq!((second.id, second.attempt), (job.id, 2));
    assert!(
        store.heartbeat("A", LEASE).await.unwrap().is_empty(),
        "A holds nothing any more"
    );
    let stale = op(
        &first,
        "A",
        Finish::Succeeded {
            model: "m".into(),
            output: serde_json::json!({"caption": "stale"}),
        },
    );
    assert!(!store.finish(stale).await.unwrap().applied);
    let fresh = op(
        &second,
        "B",
        Finish::Succeeded {
            model: "m".into(),
            output: serde_json::json!({"caption": "fresh"}),
        },
    );
    assert!(store.finish(fresh).await.unwrap().applied);
    let result = store.get_result(job.id).await.unwrap().unwrap();
    assert_eq!(
        (result.attempt, result.output["caption"].as_str()),
        (2, Some("fresh"))
    );
    let stale_fail = op(&first, "A", Finish::Failed(err("late")));
    assert!(
        !store.finish(stale_fail).await.unwrap().applied,
        "a terminal job stays terminal"
    );
    assert_eq!(
        store.get_job(job.id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
}

on_both_backends!(
    #[tokio::test]
    transient_failures_back_off_and_fail_when_attempts_run_out
);

async fn transient_failures_back_off_and_fail_when_attempts_run_out(db: &Db) {
    let store = &db.store;
    let (job, _) = store.insert_job(&new_job(1)).await.unwrap();
    for attempt in 1..=3 {
        let claimed = store.claim("A", 1, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 1, "attempt {attempt} is due");
        let later = captiond::queue::now_ms() + 60_000;
        store
            .finish(op(
                &claimed[0],
                "A",
                Finish::Retry {
                    run_at: later,
                    error: err("flaky"),
                },
            ))
            .await
            .unwrap();
        let j = store.get_job(job.id).await.unwrap().unwrap();
        if attempt < 3 {
            assert_eq!(j.state, JobState::Scheduled);
            assert!(
                store.claim("A", 1, LEASE).await.unwrap().is_empty(),
                "not due before run_at"
            );
            assert_eq!(store.next_run_at().await.unwrap(), Some(later));
            make_due(db, &j).await;
        } else {
            assert_eq!(j.state, JobState::Failed);
            assert_eq!(j.error.unwrap().code, "flaky");
        }
    }
}

/// Makes a scheduled job due now (a test shortcut for waiting out its backoff).
async fn make_due(db: &Db, job: &Job) {
    match &db.raw {
        Raw::Sqlite(_, path) => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            sqlx::query("UPDATE jobs SET run_at = 0 WHERE id = ?1")
                .bind(job.id.to_string())
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        Raw::Postgres(_, url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query("UPDATE jobs SET run_at = 0 WHERE id = $1")
                .bind(job.id.to_string())
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

on_both_backends!(
    #[tokio::test]
    out_of_memory_requeues_without_counting_the_attempt_until_its_own_cap
);

async fn out_of_memory_requeues_without_counting_the_attempt_until_its_own_cap(db: &Db) {
    let store = &db.store;
    let (job, _) = store.insert_job(&new_job(1)).await.unwrap();
    for n in 1..=3 {
        let c = store.claim("A", 1, LEASE).await.unwrap().remove(0);
        assert_eq!(c.attempt, 1, "OOM requeues do not consume attempts");
        store
            .finish(op(
                &c,
                "A",
                Finish::OutOfMemory {
                    max_oom: 3,
                    error: err("out_of_memory"),
                },
            ))
            .await
            .unwrap();
        let j = store.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(j.oom_count, n);
        assert!(
            j.run_at >= captiond::queue::now_ms() + 500,
            "requeued after a short pause, not in a hot loop"
        );
        make_due(db, &j).await;
        assert_eq!(
            j.state,
            if n < 3 {
                JobState::Queued
            } else {
                JobState::Failed
            }
        );
    }
}

on_both_backends!(
    #[tokio::test]
    cancelling_a_running_job_reaches_its_worker_through_the_heartbeat
);

async fn cancelling_a_running_job_reaches_its_worker_through_the_heartbeat(db: &Db) {
    let store = &db.store;
    let (job, _) = store.insert_job(&new_job(1)).await.unwrap();
    let c = store.claim("A", 1, LEASE).await.unwrap().remove(0);
    assert!(matches!(
        store.cancel(job.id).await.unwrap(),
        Some(CancelOutcome::Requested(_))
    ));
    let hb = store.heartbeat("A", LEASE).await.unwrap();
    assert!(hb[0].cancel);
    store.finish(op(&c, "A", Finish::Cancelled)).await.unwrap();
    assert_eq!(
        store.get_job(job.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(matches!(
        store.cancel(job.id).await.unwrap(),
        Some(CancelOutcome::AlreadyFinished(_))
    ));
}

on_both_backends!(
    #[tokio::test]
    a_released_job_goes_back_without_using_an_attempt_and_priority_orders_claims
);

async fn a_released_job_goes_back_without_using_an_attempt_and_priority_orders_claims(db: &Db) {
    let store = &db.store;
    let (low, _) = store.insert_job(&new_job(1)).await.unwrap();
    let (high, _) = store
        .insert_job(&NewJob {
            priority: 10,
            ..new_job(2)
        })
        .await
        .unwrap();
    let c = store.claim("A", 1, LEASE).await.unwrap().remove(0);
    assert_eq!(c.id, high.id, "lower priority number runs first");
    store.finish(op(&c, "A", Finish::Released)).await.unwrap();
    let j = store.get_job(high.id).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Queued, 0));
    let both = store.claim("A", 5, LEASE).await.unwrap();
    assert_eq!(
        both.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![high.id, low.id]
    );
}

on_both_backends!(
    #[tokio::test]
    one_group_commit_applies_every_kind_of_outcome_and_claims_for_each_owner
);

/// Every kind of outcome, a stale one, and claims for two owners arrive together and are
/// written in one group commit (a current-thread runtime queues them all before the
/// finisher runs); each is applied, or refused, as if it had been written alone.
async fn one_group_commit_applies_every_kind_of_outcome_and_claims_for_each_owner(db: &Db) {
    let store = &db.store;
    for i in 0..8 {
        store.insert_job(&new_job(i)).await.unwrap();
    }
    let a = store.claim("A", 7, LEASE).await.unwrap();
    let b = store.claim("B", 1, LEASE).await.unwrap().remove(0);
    let mut next_ids = Vec::new();
    for i in 0..3 {
        let (j, _) = store
            .insert_job(&NewJob {
                priority: 10,
                ..new_job(100 + i)
            })
            .await
            .unwrap();
        next_ids.push(j.id);
    }
    let succeeded = |caption: &str| Finish::Succeeded {
        model: "m".into(),
        output: serde_json::json!({"caption": caption}),
    };
    let later = captiond::queue::now_ms() + 60_000;
    let mut stale = op(&a[6], "A", succeeded("stale"));
    stale.attempt += 1;
    let ops = [
        FinishOp {
            claim_next: Some(LEASE),
            ..op(&a[0], "A", succeeded("a0"))
        },
        op(&a[1], "A", Finish::Failed(err("bad_image"))),
        op(
            &a[2],
            "A",
            Finish::Retry {
                run_at: later,
                error: err("busy"),
            },
        ),
        op(
            &a[3],
            "A",
            Finish::OutOfMemory {
                max_oom: 3,
                error: err("oom"),
            },
        ),
        op(&a[4], "A", Finish::Cancelled),
        op(&a[5], "A", Finish::Released),
        stale,
        FinishOp {
            claim_next: Some(Duration::from_secs(90)),
            ..op(&b, "B", succeeded("b"))
        },
    ];
    let outcomes = futures::future::join_all(ops.into_iter().map(|o| store.finish(o))).await;
    let outcomes: Vec<_> = outcomes.into_iter().map(Result::unwrap).collect();
    let applied: Vec<bool> = outcomes.iter().map(|o| o.applied).collect();
    assert_eq!(applied, [true, true, true, true, true, true, false, true]);

    let state = |id| {
        let store = store.clone();
        async move { store.get_job(id).await.unwrap().unwrap() }
    };
    let j = state(a[0].id).await;
    assert_eq!((j.state, j.lease_owner), (JobState::Succeeded, None));
    let r = store.get_result(a[0].id).await.unwrap().unwrap();
    assert_eq!((r.attempt, r.output["caption"].as_str()), (1, Some("a0")));
    let j = state(a[1].id).await;
    assert_eq!(
        (j.state, j.error.map(|e| e.code)),
        (JobState::Failed, Some("bad_image".into()))
    );
    let j = state(a[2].id).await;
    assert_eq!(
        (j.state, j.run_at, j.attempt),
        (JobState::Scheduled, later, 1)
    );
    let j = state(a[3].id).await;
    assert_eq!((j.state, j.attempt, j.oom_count), (JobState::Queued, 0, 1));
    assert_eq!(state(a[4].id).await.state, JobState::Cancelled);
    let j = state(a[5].id).await;
    assert_eq!((j.state, j.attempt), (JobState::Queued, 0));
    let j = state(a[6].id).await;
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Running, 1),
        "the stale write changed nothing"
    );
    assert!(store.get_result(a[6].id).await.unwrap().is_none());
    assert_eq!(state(b.id).await.state, JobState::Succeeded);

    // Each owner got its next job under its own lease, the highest priority first.
    let next_a = outcomes[0].next.clone().expect("A's slot got a next job");
    let next_b = outcomes[7].next.clone().expect("B's slot got a next job");
    assert!(next_ids.contains(&next_a.id) && next_ids.contains(&next_b.id));
    assert_ne!(next_a.id, next_b.id);
    assert_eq!(next_a.lease_owner.as_deref(), Some("A"));
    assert_eq!(next_b.lease_owner.as_deref(), Some("B"));
    let lease_gap = next_b.lease_expires_at.unwrap() - next_a.lease_expires_at.unwrap();
    assert!(
        (59_000..=61_000).contains(&lease_gap),
        "B's lease is 90 s, A's 30 s: {lease_gap}"
    );
    assert!(outcomes[1..7].iter().all(|o| o.next.is_none()));
    assert_eq!(store.counts(None).await.unwrap().running, 3);
}

/// Fails the first attempt of every job transiently, sleeps, then succeeds; counts concurrency.
struct Flaky {
    seen: Mutex<Vec<uuid::Uuid>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    sleep: Duration,
}

impl JobHandler for Flaky {
    fn handle(&self, job: &Job, _ctl: &JobControl) -> Result<HandlerOutput, JobFailure> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.sleep);
        self.running.fetch_sub(1, Ordering::SeqCst);
        let first = {
            let mut seen = self.seen.lock().unwrap();
            let first = !seen.contains(&job.id);
            seen.push(job.id);
            first
        };
        if first {
            return Err(JobFailure::Transient(err("flaky")));
        }
        Ok(HandlerOutput {
            model: "flaky".into(),
            output: serde_json::json!({"ok": true}),
        })
    }
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_pool_retries_after_backoff_keeps_leases_alive_and_respects_its_target
);

async fn the_pool_retries_after_backoff_keeps_leases_alive_and_respects_its_target(db: &Db) {
    let store = &db.store;
    for i in 0..6 {
        store.insert_job(&new_job(i)).await.unwrap();
    }
    let handler = Arc::new(Flaky {
        seen: Mutex::new(vec![]),
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        sleep: Duration::from_millis(700),
    });
    let cfg = PoolConfig {
        lease: Duration::from_millis(600),
        poll_interval: Duration::from_millis(200),
        max_concurrency: 2,
        retry: RetryPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(100),
            factor: 2.0,
            jitter: false,
        },
        ..PoolConfig::default()
    };
    let pool = WorkerPool::start(
        store.clone(),
        handler.clone(),
        Wakeup::default(),
        JobEvents::default(),
        cfg,
    )
    .await
    .unwrap();
    for _ in 0..200 {
        if store.counts(None).await.unwrap().succeeded == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.shutdown().await;
    let c = store.counts(None).await.unwrap();
    assert_eq!(c.succeeded, 6, "{c:?}");
    assert!(
        handler.peak.load(Ordering::SeqCst) <= 2,
        "never more than the target at once"
    );
    let jobs = store
        .list_jobs(&captiond::queue::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    for j in jobs {
        assert_eq!(
            j.attempt, 2,
            "one transient failure, one success; the 700 ms runs outlived the 600 ms lease only through heartbeats"
        );
    }
}

/// Hosts starting together against an empty PostgreSQL database: the migrations run
/// once (sqlx holds an advisory lock) and every host opens the same queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_starting_together_on_an_empty_postgres_database_migrate_it_once() {
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let url = cluster.fresh_database("together").await;
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { Store::connect_postgres(&url, &StoreOptions::default()).await })
    });
    let mut stores = Vec::new();
    for h in opens {
        stores.push(h.await.unwrap().expect("every host opens the queue"));
    }
    let (job, _) = stores[0].insert_job(&new_job(1)).await.unwrap();
    let seen = stores[3].get_job(job.id).await.unwrap().unwrap();
    assert_eq!(seen.id, job.id);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 1, "the schema's one migration, applied once");
    for s in stores {
        s.close().await;
    }
}

/// Rows in PostgreSQL's `blobs` table (none on SQLite, which keeps uploads as files).
async fn blob_rows(db: &Db) -> i64 {
    match &db.raw {
        Raw::Sqlite(..) => 0,
        Raw::Postgres(_, url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let n = sqlx::query_scalar("SELECT COUNT(*) FROM blobs")
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
    }
}

/// Stores uploads off the async runtime, as the API's handlers do.
async fn put_all(blobs: &BlobStore, items: &[&'static [u8]]) -> Vec<String> {
    let (blobs, items) = (blobs.clone(), items.to_vec());
    tokio::task::spawn_blocking(move || items.iter().map(|b| blobs.put(b).unwrap()).collect())
        .await
        .unwrap()
}

fn blob_job(id: &str) -> NewJob {
    NewJob {
        source: ImageSource::Blob(id.to_string()),
        ..new_job(0)
    }
}

on_both_backends!(
    #[tokio::test]
    uploads_no_job_needs_are_swept_after_the_grace
);
async fn uploads_no_job_needs_are_swept_after_the_grace(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::new(dir.path().join("blobs"))
        .unwrap()
        .with_database(&db.store);
    let ids = put_all(
        &blobs,
        &[b"queued", b"failed", b"orphan", b"succeeded", b"shared"],
    )
    .await;
    let [queued, failed, orphan, succeeded, shared] = &ids[..] else {
        unreachable!()
    };
    // Finished: one failed, one succeeded, and two jobs of one upload, one of each.
    let ends = [
        (failed, false),
        (succeeded, true),
        (shared, true),
        (shared, false),
    ];
    let mut outcome = HashMap::new();
    for (blob, ok) in ends {
        let (job, _) = db.store.insert_job(&blob_job(blob)).await.unwrap();
        outcome.insert(job.id, ok);
    }
    let owner = "sweep-test";
    let claimed = db.store.claim(owner, 4, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 4);
    for job in &claimed {
        let finish = if outcome[&job.id] {
            Finish::Succeeded {
                model: "m".into(),
                output: serde_json::json!({"caption": "x"}),
            }
        } else {
            Finish::Failed(err("bad_image"))
        };
        assert!(
            db.store
                .finish(op(job, owner, finish))
                .await
                .unwrap()
                .applied
        );
    }
    db.store.insert_job(&blob_job(queued)).await.unwrap();
    // An interrupted write's temp file.
    std::fs::write(
        dir.path().join("blobs").join(&orphan[..2]).join(".tmpXYZ"),
        b"x",
    )
    .unwrap();
    let pg = u64::from(matches!(db.raw, Raw::Postgres(..)));
    assert_eq!(blob_rows(db).await, 5 * pg as i64);
    let present = |expected: &[(&String, bool)]| {
        let b = blobs.clone();
        let expected: Vec<(String, bool)> = expected
            .iter()
            .map(|(id, on)| ((*id).clone(), *on))
            .collect();
        async move {
            tokio::task::spawn_blocking(move || {
                for (id, on) in expected {
                    match b.get(&id) {
                        Ok(_) => assert!(on, "{id} should have been swept"),
                        Err(BlobError::Missing(_)) => assert!(!on, "{id} was swept"),
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
            })
            .await
            .unwrap()
        }
    };

    // Everything is newer than the grace: nothing goes, even with no keep time.
    let swept = blobs
        .sweep(&db.store, SWEEP_GRACE, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(swept, Swept::default());

    // Past the grace: the orphan and the temp file go; uploads of a waiting, a failed
    // (retryable) and, when kept for ever or for a day, a succeeded job stay.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let swept = blobs.sweep(&db.store, Duration::ZERO, None).await.unwrap();
    assert_eq!(swept, Swept { files: 2, rows: pg });
    let day = Duration::from_secs(86_400);
    let swept = blobs
        .sweep(&db.store, Duration::ZERO, Some(day))
        .await
        .unwrap();
    assert_eq!(swept, Swept::default());
    present(&[
        (queued, true),
        (failed, true),
        (succeeded, true),
        (shared, true),
        (orphan, false),
    ])
    .await;
    assert_eq!(blob_rows(db).await, 4 * pg as i64);

    // Kept for no time: the succeeded job's upload goes; one that a failed job also
    // uses stays, and the succeeded job keeps its result.
    let swept = blobs
        .sweep(&db.store, Duration::ZERO, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(swept, Swept { files: 1, rows: pg });
    present(&[
        (queued, true),
        (failed, true),
        (succeeded, false),
        (shared, true),
    ])
    .await;
    assert_eq!(blob_rows(db).await, 3 * pg as i64);
    let ok: Vec<uuid::Uuid> = claimed
        .iter()
        .filter(|j| outcome[&j.id] && j.source == ImageSource::Blob(succeeded.clone()))
        .map(|j| j.id)
        .collect();
    let done = db.store.results_of(&ok).await.unwrap();
    assert_eq!(done[&ok[0]].output["caption"], "x");

    // Stored again, an old orphan's time is renewed: a request that is about to insert
    // its job keeps it through a sweep.
    put_all(&blobs, &[b"orphan"]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    put_all(&blobs, &[b"orphan"]).await;
    let swept = blobs
        .sweep(&db.store, Duration::from_millis(500), Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(swept, Swept::default());
}

on_both_backends!(
    #[tokio::test]
    result_settings_count_succeeded_jobs_under_a_key_prefix_per_settings_and_model
);

/// What `status` names when a report's settings miss: succeeded jobs whose key has the
/// prefix, per task, parameters and model; superseded keys, other prefixes, jobs not
/// succeeded and jobs without a key left out.
async fn result_settings_count_succeeded_jobs_under_a_key_prefix_per_settings_and_model(db: &Db) {
    let store = &db.store;
    let job = |i: usize, key: Option<&str>, length: &str| NewJob {
        params: serde_json::json!({ "length": length }),
        idempotency_key: key.map(str::to_string),
        ..new_job(i)
    };
    // Library keys end in a 16-character digest of their settings: h8's differs from
    // h1's (another key format of the same task and model).
    let specs = [
        (Some("lib:h1:caption:aaaaaaaaaaaaaaaa"), "short", "m1", true),
        (Some("lib:h2:caption:aaaaaaaaaaaaaaaa"), "short", "m1", true),
        (Some("lib:h3:caption:aaaaaaaaaaaaaaaa"), "short", "m2", true),
        (Some("lib:h4:caption:bbbbbbbbbbbbbbbb"), "long", "m1", true),
        (Some("lib:h5:caption:bbbbbbbbbbbbbbbb"), "long", "m1", false),
        (Some("lib:h6:caption:aaaaaaaaaaaaaaaa"), "short", "m1", true),
        (Some("other:h7"), "short", "m1", true),
        (None, "short", "m1", true),
        (Some("lib:h8:caption:cccccccccccccccc"), "short", "m1", true),
    ];
    for (i, (key, length, model, succeed)) in specs.iter().enumerate() {
        store.insert_job(&job(i, *key, length)).await.unwrap();
        let claimed = store.claim("A", 1, LEASE).await.unwrap().remove(0);
        let finish = if *succeed {
            Finish::Succeeded {
                model: (*model).into(),
                output: serde_json::json!({"caption": "x"}),
            }
        } else {
            Finish::Failed(err("bad"))
        };
        assert!(
            store
                .finish(op(&claimed, "A", finish))
                .await
                .unwrap()
                .applied
        );
    }
    // h6's result was superseded by a later run (its key freed).
    let superseded = store
        .supersede_keys(
            &["lib:h6:caption:aaaaaaaaaaaaaaaa".into()],
            &[JobState::Succeeded],
        )
        .await
        .unwrap();
    assert_eq!(superseded, 1);

    let got = store.result_settings("lib:").await.unwrap();
    let got: Vec<(String, serde_json::Value, String, String, i64)> = got
        .into_iter()
        .map(|r| {
            let params = serde_json::from_str(&r.params).unwrap();
            (r.task, params, r.model, r.key_tail, r.jobs)
        })
        .collect();
    let short = serde_json::json!({ "length": "short" });
    let long = serde_json::json!({ "length": "long" });
    let row = |params: &serde_json::Value, model: &str, tail: &str, jobs| {
        (
            "caption".to_string(),
            params.clone(),
            model.to_string(),
            tail.to_string(),
            jobs,
        )
    };
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0], row(&short, "m1", "aaaaaaaaaaaaaaaa", 2));
    for want in [
        row(&short, "m2", "aaaaaaaaaaaaaaaa", 1),
        row(&long, "m1", "bbbbbbbbbbbbbbbb", 1),
        row(&short, "m1", "cccccccccccccccc", 1),
    ] {
        assert!(got.contains(&want), "{want:?} in {got:?}");
    }
    assert!(store.result_settings("none:").await.unwrap().is_empty());
}

//! The queue on PostgreSQL, for several hosts on one queue: claims with
//! `FOR UPDATE SKIP LOCKED` over a partial index, finishing writes grouped into one
//! transaction, leases fenced by owner and attempt, and `NOTIFY` on every change that
//! makes work claimable. Its SQL lives here and in `migrations/postgres/`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    ALL, BatchRow, BatchSummary, CANCELLED, Calibration, CancelOutcome, FAILED, FinishOp,
    FinishOutcome, Heartbeat, LibraryFile, ListQuery, OOM, RELEASED, RETRY, ResultSettings,
    RetryOutcome, SUCCEEDED, StateCounts, StoreError, StoreOptions, StoreResult, by_kind,
    claim_groups, fold_batch_rows, outcomes, parse_uuid, read_job, reply_all, source_columns,
};
use crate::queue::{ImageSource, Job, JobErrorInfo, JobResult, JobState, NewJob, TaskKind, now_ms};

/// The channel every host listens on; a notification means "there may be work".
pub const WAKE_CHANNEL: &str = "captiond_jobs";

macro_rules! pg_job_columns {
    () => {
        "id, task, params, source_kind, source, priority, state, attempt, max_attempts, oom_count, run_at, lease_owner, lease_expires_at, cancel_requested, error_code, error_message, created_at, started_at, finished_at, idempotency_key, batch_id"
    };
}

const SQL_INSERT_JOB: &str = concat!(
    "INSERT INTO jobs (id, task, params, source_kind, source, priority, state, max_attempts, run_at, created_at, idempotency_key, batch_id) ",
    "VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $8, $9, NULL) ON CONFLICT (idempotency_key) DO NOTHING RETURNING ",
    pg_job_columns!()
);
const SQL_INSERT_MANY: &str = concat!(
    "INSERT INTO jobs (id, task, params, source_kind, source, priority, state, max_attempts, run_at, created_at, idempotency_key, batch_id) ",
    "SELECT j ->> 'id', j ->> 'task', j ->> 'params', j ->> 'kind', j ->> 'source', (j ->> 'priority')::bigint, 'queued', ",
    "(j ->> 'max_attempts')::bigint, $2, $2, j ->> 'key', $3 FROM jsonb_array_elements($1::jsonb) AS j ",
    "ON CONFLICT (idempotency_key) DO NOTHING"
);
const SQL_IDS_BY_KEYS: &str = "SELECT idempotency_key, id FROM jobs WHERE idempotency_key IN (SELECT jsonb_array_elements_text($1::jsonb))";
const SQL_JOB_BY_ID: &str = concat!("SELECT ", pg_job_columns!(), " FROM jobs WHERE id = $1");
const SQL_JOB_BY_KEY: &str = concat!(
    "SELECT ",
    pg_job_columns!(),
    " FROM jobs WHERE idempotency_key = $1"
);
const SQL_LIST: &str = concat!(
    "SELECT ",
    pg_job_columns!(),
    " FROM jobs WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR batch_id = $2) ",
    "AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4"
);
/// Claims due jobs in claim order; rows another host is claiming are skipped, not waited for.
const SQL_CLAIM: &str = concat!(
    "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = $1, lease_expires_at = $2, ",
    "started_at = COALESCE(started_at, $3), cancel_requested = 0 ",
    "WHERE id IN (SELECT id FROM jobs WHERE state IN ('queued', 'scheduled') AND run_at <= $3 ",
    "ORDER BY priority, run_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING ",
    pg_job_columns!()
);
const SQL_HEARTBEAT: &str = "UPDATE jobs SET lease_expires_at = $2 WHERE lease_owner = $1 AND state = 'running' RETURNING id, attempt, cancel_requested";
/// The finishing ops of one kind, joined to the jobs whose lease they still hold.
macro_rules! finishing {
    () => {
        concat!(
            " FROM jsonb_to_recordset($1::jsonb) AS f(id text, owner text, attempt bigint, run_at bigint, ",
            "code text, message text, max_oom bigint) ",
            "WHERE jobs.id = f.id AND jobs.lease_owner = f.owner AND jobs.attempt = f.attempt AND jobs.state = 'running'"
        )
    };
}
/// Locks the rows whose lease is still held and returns them: exactly those the
/// statements that follow apply.
const SQL_HELD: &str = concat!(
    "SELECT jobs.id, jobs.attempt FROM jobs JOIN jsonb_to_recordset($1::jsonb) AS f(id text, owner text, attempt bigint) ",
    "ON jobs.id = f.id AND jobs.lease_owner = f.owner AND jobs.attempt = f.attempt ",
    "WHERE jobs.state = 'running' ORDER BY jobs.id FOR UPDATE OF jobs"
);
const SQL_RESULTS: &str = concat!(
    "INSERT INTO results (job_id, attempt, model, output, created_at) ",
    "SELECT f.id, f.attempt, f.model, f.output::text, $2 ",
    "FROM jsonb_to_recordset($1::jsonb) AS f(id text, owner text, attempt bigint, model text, output jsonb) ",
    "JOIN jobs ON jobs.id = f.id AND jobs.lease_owner = f.owner AND jobs.attempt = f.attempt AND jobs.state = 'running' ",
    "ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, model = EXCLUDED.model, output = EXCLUDED.output, ",
    "created_at = EXCLUDED.created_at"
);
const SQL_SUCCEED: &str = concat!(
    "UPDATE jobs SET state = 'succeeded', finished_at = $2, lease_owner = NULL, lease_expires_at = NULL, ",
    "error_code = NULL, error_message = NULL",
    finishing!()
);
const SQL_FAIL: &str = concat!(
    "UPDATE jobs SET state = 'failed', finished_at = $2, lease_owner = NULL, lease_expires_at = NULL, ",
    "error_code = f.code, error_message = f.message",
    finishing!()
);
const SQL_RETRY_LATER: &str = concat!(
    "UPDATE jobs SET state = CASE WHEN jobs.attempt >= jobs.max_attempts THEN 'failed' ELSE 'scheduled' END, ",
    "finished_at = CASE WHEN jobs.attempt >= jobs.max_attempts THEN $2 ELSE NULL END, run_at = f.run_at, ",
    "lease_owner = NULL, lease_expires_at = NULL, error_code = f.code, error_message = f.message",
    finishing!()
);
const SQL_OOM: &str = concat!(
    "UPDATE jobs SET oom_count = jobs.oom_count + 1, attempt = jobs.attempt - 1, ",
    "state = CASE WHEN oom_count + 1 >= f.max_oom THEN 'failed' ELSE 'queued' END, ",
    "finished_at = CASE WHEN oom_count + 1 >= f.max_oom THEN $2 ELSE NULL END, run_at = $2 + 1000 * (oom_count + 1), ",
    "lease_owner = NULL, lease_expires_at = NULL, error_code = f.code, error_message = f.message",
    finishing!()
);
const SQL_CANCELLED: &str = concat!(
    "UPDATE jobs SET state = 'cancelled', finished_at = $2, lease_owner = NULL, lease_expires_at = NULL, ",
    "error_code = 'cancelled', error_message = 'cancelled on request'",
    finishing!()
);
const SQL_RELEASED: &str = concat!(
    "UPDATE jobs SET state = 'queued', attempt = jobs.attempt - 1, run_at = $2, lease_owner = NULL, lease_expires_at = NULL",
    finishing!()
);
/// The common group in one statement and one commit: successes (guarded), their
/// results, and the claim of the slots' next jobs. Returns at least one row: the applied
/// (id, attempt) pairs as JSON, with a claimed job's columns (or NULLs).
const SQL_SUCCEED_AND_CLAIM: &str = concat!(
    "WITH f AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS f(id text, owner text, attempt bigint, model text, output jsonb)), ",
    "done AS (UPDATE jobs SET state = 'succeeded', finished_at = $2, lease_owner = NULL, lease_expires_at = NULL, ",
    "error_code = NULL, error_message = NULL FROM f ",
    "WHERE jobs.id = f.id AND jobs.lease_owner = f.owner AND jobs.attempt = f.attempt AND jobs.state = 'running' ",
    "RETURNING jobs.id, jobs.attempt), ",
    "res AS (INSERT INTO results (job_id, attempt, model, output, created_at) ",
    "SELECT f.id, f.attempt, f.model, f.output::text, $2 FROM f JOIN done ON done.id = f.id AND done.attempt = f.attempt ",
    "ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, model = EXCLUDED.model, output = EXCLUDED.output, ",
    "created_at = EXCLUDED.created_at), ",
    "claimed AS (UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = $3, lease_expires_at = $4, ",
    "started_at = COALESCE(started_at, $2), cancel_requested = 0 ",
    "WHERE id IN (SELECT id FROM jobs WHERE state IN ('queued', 'scheduled') AND run_at <= $2 ",
    "ORDER BY priority, run_at LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING ",
    pg_job_columns!(),
    ") SELECT (SELECT COALESCE(json_agg(json_build_array(done.id, done.attempt)), '[]'::json)::text FROM done) AS applied, ",
    "c.* FROM (SELECT 1) AS one LEFT JOIN claimed c ON true"
);
const SQL_CANCEL_WAITING: &str = "UPDATE jobs SET state = 'cancelled', finished_at = $2, error_code = 'cancelled', error_message = 'cancelled on request' WHERE id = $1 AND state IN ('queued', 'scheduled')";
const SQL_CANCEL_RUNNING: &str =
    "UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state = 'running'";
const SQL_RETRY: &str = "UPDATE jobs SET state = 'queued', attempt = 0, oom_count = 0, run_at = $2, finished_at = NULL, error_code = NULL, error_message = NULL, cancel_requested = 0 WHERE id = $1 AND state IN ('failed', 'cancelled')";
/// Expired leases of any host (or, with `$3`, every lease `$3` held: a restarting host's own).
const SQL_RESCUE: &str = concat!(
    "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'cancelled' WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END, ",
    "finished_at = CASE WHEN cancel_requested = 1 OR attempt >= max_attempts THEN $1 ELSE NULL END, run_at = $1, ",
    "error_code = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'lease_expired' END, ",
    "error_message = CASE WHEN cancel_requested = 1 THEN 'cancelled on request' ELSE 'the worker stopped heartbeating (crash or hang); attempt ' || attempt || ' of ' || max_attempts END, ",
    "lease_owner = NULL, lease_expires_at = NULL ",
    "WHERE state = 'running' AND ($2 OR lease_expires_at < $1 OR ($3::text IS NOT NULL AND starts_with(lease_owner, $3)))"
);
const SQL_NEXT_RUN_AT: &str = "SELECT MIN(run_at) FROM jobs WHERE state IN ('queued', 'scheduled')";
const SQL_DUE_COUNT: &str =
    "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'scheduled') AND run_at <= $1";
const SQL_COUNTS: &str = "SELECT state, COUNT(*) FROM jobs GROUP BY state";
const SQL_BATCH_COUNTS: &str =
    "SELECT state, COUNT(*) FROM jobs WHERE batch_id = $1 GROUP BY state";
const SQL_BATCH: &str = "SELECT created_at, total FROM batches WHERE id = $1";
const SQL_INSERT_BATCH: &str = "INSERT INTO batches (id, created_at, total) VALUES ($1, $2, $3)";
const SQL_SUCCEEDED_SINCE: &str = "SELECT COUNT(*) FROM jobs WHERE finished_at >= $1 AND state = 'succeeded' AND ($2::text IS NULL OR batch_id = $2)";
const SQL_FINISHED_PAGE: &str = concat!(
    "SELECT j.*, r.attempt AS r_attempt, r.model AS r_model, r.output AS r_output, r.created_at AS r_created_at ",
    "FROM (SELECT ",
    pg_job_columns!(),
    " FROM jobs WHERE finished_at IS NOT NULL AND (finished_at > $1 OR (finished_at = $1 AND id > $2)) ",
    "ORDER BY finished_at, id LIMIT $3) j LEFT JOIN results r ON r.job_id = j.id ORDER BY j.finished_at, j.id"
);
const SQL_RECENT: &str = concat!(
    "SELECT j.*, r.attempt AS r_attempt, r.model AS r_model, r.output AS r_output, r.created_at AS r_created_at ",
    "FROM (SELECT ",
    pg_job_columns!(),
    " FROM jobs WHERE finished_at IS NOT NULL AND finished_at < $1 AND ($2::text IS NULL OR state = $2) ",
    "AND ($3::text IS NULL OR batch_id = $3) ORDER BY finished_at DESC, id DESC LIMIT $4) j ",
    "LEFT JOIN results r ON r.job_id = j.id ORDER BY j.finished_at DESC, j.id DESC"
);
const SQL_RETRY_BATCH: &str = "UPDATE jobs SET state = 'queued', attempt = 0, oom_count = 0, run_at = $2, finished_at = NULL, error_code = NULL, error_message = NULL, cancel_requested = 0 WHERE batch_id = $1 AND state = 'failed'";
const SQL_RECENT_BATCHES: &str = concat!(
    "SELECT b.id, b.created_at, b.total, j.state, COUNT(j.id) ",
    "FROM (SELECT id, created_at, total FROM batches ORDER BY created_at DESC, id DESC LIMIT $1) b ",
    "LEFT JOIN jobs j ON j.batch_id = b.id GROUP BY b.id, b.created_at, b.total, j.state ",
    "ORDER BY b.created_at DESC, b.id DESC"
);
const SQL_RESULT: &str = "SELECT attempt, model, output, created_at FROM results WHERE job_id = $1";
const SQL_SET_SETTING: &str = "INSERT INTO queue_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
const SQL_GET_SETTING: &str = "SELECT value FROM queue_settings WHERE key = $1";
const SQL_GET_CALIBRATION: &str = "SELECT max_concurrency, per_generation_bytes, baseline_used_bytes, total_bytes, measured_at FROM calibrations WHERE device = $1 AND model = $2";
const SQL_PUT_CALIBRATION: &str = concat!(
    "INSERT INTO calibrations (device, model, max_concurrency, per_generation_bytes, baseline_used_bytes, total_bytes, measured_at) ",
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (device, model) DO UPDATE SET max_concurrency = EXCLUDED.max_concurrency, ",
    "per_generation_bytes = EXCLUDED.per_generation_bytes, baseline_used_bytes = EXCLUDED.baseline_used_bytes, ",
    "total_bytes = EXCLUDED.total_bytes, measured_at = EXCLUDED.measured_at"
);
const SQL_NOTIFY: &str = "SELECT pg_notify($1, '')";
const SQL_NOTIFY_WITH: &str = "SELECT pg_notify($1, $2)";
/// Notification payloads that switch every host's claiming off and on.
const PAUSE: &str = "pause";
const RESUME: &str = "resume";
const SQL_FILES_UNDER: &str =
    "SELECT path, size, mtime_ns, hash, is_image FROM library_files WHERE starts_with(path, $1)";
const SQL_PUT_FILES: &str = concat!(
    "INSERT INTO library_files (path, size, mtime_ns, hash, is_image, seen_at) ",
    "SELECT f ->> 'path', (f ->> 'size')::bigint, (f ->> 'mtime_ns')::bigint, f ->> 'hash', (f ->> 'is_image')::bigint, $2 ",
    "FROM jsonb_array_elements($1::jsonb) AS f ",
    "ON CONFLICT (path) DO UPDATE SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, ",
    "hash = EXCLUDED.hash, is_image = EXCLUDED.is_image, seen_at = EXCLUDED.seen_at"
);
const SQL_FORGET_FILES: &str =
    "DELETE FROM library_files WHERE path IN (SELECT jsonb_array_elements_text($1::jsonb))";
const SQL_JOBS_BY_KEYS: &str = concat!(
    "SELECT ",
    pg_job_columns!(),
    " FROM jobs WHERE idempotency_key IN (SELECT jsonb_array_elements_text($1::jsonb))"
);
const SQL_STATES_BY_IDS: &str =
    "SELECT id, state FROM jobs WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))";
const SQL_SUPERSEDE: &str = concat!(
    "UPDATE jobs SET idempotency_key = idempotency_key || '#' || id ",
    "WHERE idempotency_key IN (SELECT jsonb_array_elements_text($1::jsonb)) ",
    "AND state IN (SELECT jsonb_array_elements_text($2::jsonb))"
);
const SQL_RESULTS_BY_IDS: &str = "SELECT job_id, attempt, model, output, created_at FROM results WHERE job_id IN (SELECT jsonb_array_elements_text($1::jsonb))";
/// Succeeded jobs under current (not superseded) keys with a prefix, grouped by the
/// settings that made their results.
const SQL_RESULT_SETTINGS: &str = concat!(
    "SELECT j.task, j.params, r.model, right(j.idempotency_key, 16) AS tail, COUNT(*) ",
    "FROM jobs j JOIN results r ON r.job_id = j.id ",
    "WHERE starts_with(j.idempotency_key, $1) AND strpos(j.idempotency_key, '#') = 0 ",
    "AND j.state = 'succeeded' GROUP BY j.task, j.params, r.model, tail ORDER BY COUNT(*) DESC, r.model, tail"
);
const SQL_GET_EXPORT: &str = "SELECT content_hash FROM export_files WHERE path = $1";
const SQL_PUT_EXPORT: &str = concat!(
    "INSERT INTO export_files (path, content_hash, written_at) VALUES ($1, $2, $3) ",
    "ON CONFLICT (path) DO UPDATE SET content_hash = EXCLUDED.content_hash, written_at = EXCLUDED.written_at"
);
const SQL_PUT_BLOB: &str = "INSERT INTO blobs (hash, bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT (hash) DO UPDATE SET created_at = EXCLUDED.created_at";
/// Uploads stored before `$1` that no job refers to.
// $2: uploads of jobs that succeeded before it are no longer needed (i64::MIN: every upload still is).
const SQL_SWEEP_BLOBS: &str = "DELETE FROM blobs b WHERE b.created_at < $1 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source_kind = 'blob' AND j.source = b.hash AND NOT (j.state = 'succeeded' AND COALESCE(j.finished_at, $2) < $2))";
/// The upload digests jobs refer to.
const SQL_BLOBS_IN_USE: &str = "SELECT DISTINCT source FROM jobs WHERE source_kind = 'blob' AND NOT (state = 'succeeded' AND COALESCE(finished_at, $1) < $1)";
const SQL_GET_BLOB: &str = "SELECT bytes FROM blobs WHERE hash = $1";

/// How many values one JSON-array statement carries.
const CHUNK: usize = 5_000;

/// The queue's PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    finisher: mpsc::Sender<(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)>,
}

fn json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidRow(e.to_string()))
}

fn job_from_row(r: &PgRow) -> StoreResult<Job> {
    read_job!(r)
}

fn job_with_result(r: &PgRow) -> StoreResult<(Job, Option<JobResult>)> {
    let job = job_from_row(r)?;
    let output: Option<String> = r.try_get("r_output")?;
    let result = match output {
        None => None,
        Some(output) => Some(JobResult {
            attempt: r.try_get("r_attempt")?,
            model: r.try_get("r_model")?,
            output: serde_json::from_str(&output)
                .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
            created_at: r.try_get("r_created_at")?,
        }),
    };
    Ok((job, result))
}

fn claimed_in_order(rows: &[PgRow]) -> StoreResult<Vec<Job>> {
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
    Ok(jobs)
}

impl PgStore {
    /// Connects and runs the migrations (sqlx holds an advisory lock while it does, so
    /// hosts starting together migrate once).
    pub async fn connect(url: &str, opts: &StoreOptions) -> StoreResult<Self> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Unavailable(format!("bad database URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.read_connections.max(2) + 6)
            .acquire_timeout(opts.busy_timeout.max(Duration::from_secs(5)))
            .connect_with(connect)
            .await?;
        super::migrator(super::POSTGRES_MIGRATIONS)
            .run(&pool)
            .await?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run_finisher(pool.clone(), rx));
        Ok(Self { pool, finisher: tx })
    }

    /// Follows `NOTIFY` from every host and wakes this one's dispatcher, until `stop`;
    /// reconnects with backoff when the server goes away (and wakes then, since a
    /// notification may have been missed).
    /// `on_pause` hears pause/resume from any host (and the stored switch after every
    /// reconnect, in case a notification was missed).
    pub fn spawn_listener(
        &self,
        wakeup: crate::queue::Wakeup,
        stop: tokio_util::sync::CancellationToken,
        on_pause: impl Fn(bool) + Send + Sync + 'static,
    ) {
        let pool = self.pool.clone();
        let store = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let listener = async {
                    let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                    l.listen(WAKE_CHANNEL).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                let mut listener = tokio::select! {
                    l = listener => l,
                    _ = stop.cancelled() => return,
                };
                match &mut listener {
                    Ok(l) => {
                        delay = Duration::from_millis(100);
                        if let Ok(paused) = store.is_paused().await {
                            on_pause(paused);
                        }
                        wakeup.wake();
                        loop {
                            let got = tokio::select! {
                                n = l.try_recv() => n,
                                _ = stop.cancelled() => return,
                            };
                            match got {
                                Ok(Some(n)) => match n.payload() {
                                    PAUSE => on_pause(true),
                                    RESUME => {
                                        on_pause(false);
                                        wakeup.wake();
                                    }
                                    _ => wakeup.wake(),
                                },
                                // The connection dropped: listen afresh (and re-read
                                // the pause switch, whose notification may be lost).
                                Ok(None) => {
                                    tracing::warn!(
                                        "lost the PostgreSQL LISTEN connection; reconnecting"
                                    );
                                    wakeup.wake();
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "PostgreSQL LISTEN failed; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot LISTEN on PostgreSQL")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Tells every host (this one included) that there may be work.
    pub async fn notify(&self) -> StoreResult<()> {
        sqlx::query(SQL_NOTIFY)
            .bind(WAKE_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn insert_job(&self, new: &NewJob) -> StoreResult<(Job, bool)> {
        self.insert_job_as(Uuid::now_v7(), new).await
    }

    pub async fn insert_job_as(&self, id: Uuid, new: &NewJob) -> StoreResult<(Job, bool)> {
        let (kind, source) = source_columns(&new.source);
        let inserted = sqlx::query(SQL_INSERT_JOB)
            .bind(id.to_string())
            .bind(new.task.as_str())
            .bind(new.params.to_string())
            .bind(kind)
            .bind(source)
            .bind(new.priority)
            .bind(new.max_attempts)
            .bind(now_ms())
            .bind(new.idempotency_key.clone())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = inserted {
            self.notify().await?;
            return Ok((job_from_row(&row)?, true));
        }
        let key = new.idempotency_key.clone().unwrap_or_default();
        let row = sqlx::query(SQL_JOB_BY_KEY)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok((job_from_row(&row)?, false))
    }

    pub async fn insert_batch(&self, jobs: &[NewJob]) -> StoreResult<(Uuid, Vec<Uuid>)> {
        let batch = Uuid::now_v7();
        let now = now_ms();
        let mut ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
        let rows: Vec<serde_json::Value> = jobs
            .iter()
            .zip(&ids)
            .map(|(new, id)| {
                let (kind, source) = source_columns(&new.source);
                serde_json::json!({
                    "id": id.to_string(), "task": new.task.as_str(), "params": new.params,
                    "kind": kind, "source": source, "priority": new.priority,
                    "max_attempts": new.max_attempts, "key": new.idempotency_key,
                })
            })
            .collect();
        let keys: Vec<&str> = jobs
            .iter()
            .filter_map(|j| j.idempotency_key.as_deref())
            .collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(SQL_INSERT_BATCH)
            .bind(batch.to_string())
            .bind(now)
            .bind(jobs.len() as i64)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(SQL_INSERT_MANY)
            .bind(json(&rows)?)
            .bind(now)
            .bind(batch.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() as usize != jobs.len() && !keys.is_empty() {
            let existing: Vec<(String, String)> = sqlx::query_as(SQL_IDS_BY_KEYS)
                .bind(json(&keys)?)
                .fetch_all(&mut *tx)
                .await?;
            let by_key: HashMap<String, String> = existing.into_iter().collect();
            for (new, id) in jobs.iter().zip(ids.iter_mut()) {
                if let Some(found) = new.idempotency_key.as_ref().and_then(|k| by_key.get(k)) {
                    *id = parse_uuid(found)?;
                }
            }
        }
        sqlx::query(SQL_NOTIFY)
            .bind(WAKE_CHANNEL)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((batch, ids))
    }

    pub async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        let row = sqlx::query(SQL_JOB_BY_ID)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    pub async fn get_result(&self, id: Uuid) -> StoreResult<Option<JobResult>> {
        let row = sqlx::query(SQL_RESULT)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let output: String = r.try_get(2)?;
            Ok(JobResult {
                attempt: r.try_get(0)?,
                model: r.try_get(1)?,
                output: serde_json::from_str(&output)
                    .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
                created_at: r.try_get(3)?,
            })
        })
        .transpose()
    }

    pub async fn list_jobs(&self, q: &ListQuery) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(SQL_LIST)
            .bind(q.state.map(|s| s.as_str()))
            .bind(q.batch.map(|b| b.to_string()))
            .bind(q.after.map(|a| a.to_string()))
            .bind(q.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn claim(&self, owner: &str, n: usize, lease: Duration) -> StoreResult<Vec<Job>> {
        let now = now_ms();
        let rows = sqlx::query(SQL_CLAIM)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(n as i64)
            .fetch_all(&self.pool)
            .await?;
        if !rows.is_empty() {
            crate::failpoint::hit("claim");
        }
        claimed_in_order(&rows)
    }

    pub async fn heartbeat(&self, owner: &str, lease: Duration) -> StoreResult<Vec<Heartbeat>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(SQL_HEARTBEAT)
            .bind(owner)
            .bind(now_ms() + lease.as_millis() as i64)
            .fetch_all(&self.pool)
            .await?;
        if !rows.is_empty() {
            crate::failpoint::hit("heartbeat");
        }
        rows.into_iter()
            .map(|(id, attempt, cancel)| {
                Ok(Heartbeat {
                    id: parse_uuid(&id)?,
                    attempt,
                    cancel: cancel != 0,
                })
            })
            .collect()
    }

    pub async fn finish(&self, op: FinishOp) -> StoreResult<FinishOutcome> {
        let (tx, rx) = oneshot::channel();
        self.finisher
            .send((op, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn cancel(&self, id: Uuid) -> StoreResult<Option<CancelOutcome>> {
        let sid = id.to_string();
        let waiting = sqlx::query(SQL_CANCEL_WAITING)
            .bind(&sid)
            .bind(now_ms())
            .execute(&self.pool)
            .await?
            .rows_affected();
        let running = if waiting == 0 {
            sqlx::query(SQL_CANCEL_RUNNING)
                .bind(&sid)
                .execute(&self.pool)
                .await?
                .rows_affected()
        } else {
            0
        };
        if waiting + running > 0 {
            crate::failpoint::hit("cancel");
        }
        let Some(job) = self.get_job(id).await? else {
            return Ok(None);
        };
        Ok(Some(if waiting == 1 {
            CancelOutcome::Cancelled(job)
        } else if running == 1 {
            CancelOutcome::Requested(job)
        } else {
            CancelOutcome::AlreadyFinished(job)
        }))
    }

    pub async fn retry(&self, id: Uuid) -> StoreResult<Option<RetryOutcome>> {
        let done = sqlx::query(SQL_RETRY)
            .bind(id.to_string())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            self.notify().await?;
        }
        let Some(job) = self.get_job(id).await? else {
            return Ok(None);
        };
        Ok(Some(if done.rows_affected() == 1 {
            RetryOutcome::Queued(job)
        } else {
            RetryOutcome::NotRetryable(job)
        }))
    }

    pub async fn rescue(&self, all: bool) -> StoreResult<u64> {
        self.rescue_owned(all, None).await
    }

    /// Rescues expired leases of every host, plus every lease whose owner starts with
    /// `own_prefix` (a restarting host's earlier processes), or all leases with `all`.
    pub async fn rescue_owned(&self, all: bool, own_prefix: Option<&str>) -> StoreResult<u64> {
        let done = sqlx::query(SQL_RESCUE)
            .bind(now_ms())
            .bind(all)
            .bind(own_prefix)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() > 0 {
            self.notify().await?;
        }
        Ok(done.rows_affected())
    }

    pub async fn next_run_at(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(SQL_NEXT_RUN_AT)
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn due_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(SQL_DUE_COUNT)
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn counts(&self, batch: Option<Uuid>) -> StoreResult<StateCounts> {
        let rows: Vec<(String, i64)> = match batch {
            None => sqlx::query_as(SQL_COUNTS).fetch_all(&self.pool).await?,
            Some(b) => {
                sqlx::query_as(SQL_BATCH_COUNTS)
                    .bind(b.to_string())
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut counts = StateCounts::default();
        for (state, n) in rows {
            let st = JobState::parse(&state)
                .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?;
            counts.add(st, n);
        }
        Ok(counts)
    }

    pub async fn batch(&self, id: Uuid) -> StoreResult<Option<(i64, i64)>> {
        Ok(sqlx::query_as(SQL_BATCH)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn succeeded_since(&self, since_ms: i64, batch: Option<Uuid>) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(SQL_SUCCEEDED_SINCE)
            .bind(since_ms)
            .bind(batch.map(|b| b.to_string()))
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn finished_after(
        &self,
        since_ms: i64,
        after_id: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        let rows = sqlx::query(SQL_FINISHED_PAGE)
            .bind(since_ms)
            .bind(after_id.map(|a| a.to_string()).unwrap_or_default())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_with_result).collect()
    }

    pub async fn recently_finished(
        &self,
        state: Option<JobState>,
        batch: Option<Uuid>,
        before_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        let rows = sqlx::query(SQL_RECENT)
            .bind(before_ms)
            .bind(state.map(|s| s.as_str()))
            .bind(batch.map(|b| b.to_string()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_with_result).collect()
    }

    pub async fn retry_failed_in_batch(&self, batch: Uuid) -> StoreResult<u64> {
        let n = sqlx::query(SQL_RETRY_BATCH)
            .bind(batch.to_string())
            .bind(now_ms())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            self.notify().await?;
        }
        Ok(n)
    }

    pub async fn recent_batches(&self, limit: i64) -> StoreResult<Vec<BatchSummary>> {
        let rows: Vec<BatchRow> = sqlx::query_as(SQL_RECENT_BATCHES)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        fold_batch_rows(rows)
    }

    pub async fn set_paused(&self, paused: bool) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(SQL_SET_SETTING)
            .bind("paused")
            .bind(if paused { "1" } else { "0" })
            .execute(&mut *tx)
            .await?;
        // Every host's listener applies the switch to its own workers.
        sqlx::query(SQL_NOTIFY_WITH)
            .bind(WAKE_CHANNEL)
            .bind(if paused { PAUSE } else { RESUME })
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn is_paused(&self) -> StoreResult<bool> {
        let v: Option<String> = sqlx::query_scalar(SQL_GET_SETTING)
            .bind("paused")
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.as_deref() == Some("1"))
    }

    pub async fn calibration(&self, device: &str, model: &str) -> StoreResult<Option<Calibration>> {
        let row: Option<(i64, i64, i64, i64, i64)> = sqlx::query_as(SQL_GET_CALIBRATION)
            .bind(device)
            .bind(model)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(max, per, base, total, at)| Calibration {
            device: device.to_string(),
            model: model.to_string(),
            max_concurrency: max.max(1) as usize,
            per_generation_bytes: per.max(0) as u64,
            baseline_used_bytes: base.max(0) as u64,
            total_bytes: total.max(0) as u64,
            measured_at: at,
        }))
    }

    pub async fn put_calibration(&self, c: &Calibration) -> StoreResult<()> {
        sqlx::query(SQL_PUT_CALIBRATION)
            .bind(&c.device)
            .bind(&c.model)
            .bind(c.max_concurrency as i64)
            .bind(c.per_generation_bytes as i64)
            .bind(c.baseline_used_bytes as i64)
            .bind(c.total_bytes as i64)
            .bind(c.measured_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn library_files_under(&self, prefix: &str) -> StoreResult<Vec<LibraryFile>> {
        let rows: Vec<(String, i64, i64, String, i64)> = sqlx::query_as(SQL_FILES_UNDER)
            .bind(prefix)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(path, size, mtime_ns, hash, is_image)| LibraryFile {
                path,
                size,
                mtime_ns,
                hash,
                is_image: is_image != 0,
            })
            .collect())
    }

    pub async fn put_library_files(&self, files: &[LibraryFile]) -> StoreResult<()> {
        let now = now_ms();
        for chunk in files.chunks(CHUNK) {
            let rows: Vec<serde_json::Value> = chunk
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                        "hash": f.hash, "is_image": i64::from(f.is_image),
                    })
                })
                .collect();
            sqlx::query(SQL_PUT_FILES)
                .bind(json(&rows)?)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn forget_library_files(&self, paths: &[String]) -> StoreResult<()> {
        for chunk in paths.chunks(CHUNK) {
            sqlx::query(SQL_FORGET_FILES)
                .bind(json(&chunk)?)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn jobs_by_keys(&self, keys: &[String]) -> StoreResult<HashMap<String, Job>> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            let rows = sqlx::query(SQL_JOBS_BY_KEYS)
                .bind(json(&chunk)?)
                .fetch_all(&self.pool)
                .await?;
            for r in &rows {
                let job = job_from_row(r)?;
                if let Some(k) = job.idempotency_key.clone() {
                    out.insert(k, job);
                }
            }
        }
        Ok(out)
    }

    pub async fn result_settings(&self, key_prefix: &str) -> StoreResult<Vec<ResultSettings>> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(SQL_RESULT_SETTINGS)
            .bind(key_prefix)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(ResultSettings::from).collect())
    }

    pub async fn job_states(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobState>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let strs: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows: Vec<(String, String)> = sqlx::query_as(SQL_STATES_BY_IDS)
                .bind(json(&strs)?)
                .fetch_all(&self.pool)
                .await?;
            for (id, state) in rows {
                let st = JobState::parse(&state)
                    .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?;
                out.insert(parse_uuid(&id)?, st);
            }
        }
        Ok(out)
    }

    pub async fn supersede_keys(&self, keys: &[String], states: &[JobState]) -> StoreResult<u64> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let mut n = 0;
        for chunk in keys.chunks(CHUNK) {
            n += sqlx::query(SQL_SUPERSEDE)
                .bind(json(&chunk)?)
                .bind(json(&states)?)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(n)
    }

    pub async fn results_of(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobResult>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let strs: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows: Vec<(String, i64, String, String, i64)> = sqlx::query_as(SQL_RESULTS_BY_IDS)
                .bind(json(&strs)?)
                .fetch_all(&self.pool)
                .await?;
            for (id, attempt, model, output, created_at) in rows {
                out.insert(
                    parse_uuid(&id)?,
                    JobResult {
                        attempt,
                        model,
                        output: serde_json::from_str(&output)
                            .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
                        created_at,
                    },
                );
            }
        }
        Ok(out)
    }

    pub async fn export_record(&self, path: &str) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(SQL_GET_EXPORT)
            .bind(path)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn put_export_record(&self, path: &str, content_hash: &str) -> StoreResult<()> {
        sqlx::query(SQL_PUT_EXPORT)
            .bind(path)
            .bind(content_hash)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores upload bytes under their BLAKE3 hex (once per content; storing them again
    /// renews their time, which the sweep's grace period counts from).
    pub async fn put_blob(&self, hash: &str, bytes: &[u8]) -> StoreResult<()> {
        sqlx::query(SQL_PUT_BLOB)
            .bind(hash)
            .bind(bytes)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes the uploads stored (or stored again) before `before_ms` that no job
    /// needs (see [`crate::queue::Store::blobs_in_use`]); returns how many.
    pub async fn sweep_blobs(
        &self,
        before_ms: i64,
        succeeded_before_ms: Option<i64>,
    ) -> StoreResult<u64> {
        Ok(sqlx::query(SQL_SWEEP_BLOBS)
            .bind(before_ms)
            .bind(succeeded_before_ms.unwrap_or(i64::MIN))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// The upload digests that jobs still need (see [`crate::queue::Store::blobs_in_use`]).
    pub(crate) async fn blobs_in_use(
        &self,
        succeeded_before_ms: Option<i64>,
    ) -> StoreResult<HashSet<String>> {
        let found: Vec<String> = sqlx::query_scalar(SQL_BLOBS_IN_USE)
            .bind(succeeded_before_ms.unwrap_or(i64::MIN))
            .fetch_all(&self.pool)
            .await?;
        Ok(found.into_iter().collect())
    }

    /// The bytes of an upload, if stored.
    pub async fn get_blob(&self, hash: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar(SQL_GET_BLOB)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?)
    }
}

/// Writes finishing ops in shared transactions: whatever arrived while the previous
/// commit ran goes into the next one.
async fn run_finisher(
    pool: PgPool,
    mut rx: mpsc::Receiver<(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)>,
) {
    let mut pending = Vec::with_capacity(256);
    while rx.recv_many(&mut pending, 256).await > 0 {
        let outcome = apply_finishes(&pool, &pending).await;
        reply_all(&mut pending, outcome);
        for _ in 0..super::COALESCE_YIELDS {
            tokio::task::yield_now().await;
        }
    }
}

async fn apply_finishes(
    pool: &PgPool,
    ops: &[(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)],
) -> StoreResult<Vec<FinishOutcome>> {
    let now = now_ms();
    let kinds = by_kind(ops);
    let claims = claim_groups(ops);
    let only_successes = [FAILED, RETRY, OOM, CANCELLED, RELEASED]
        .iter()
        .all(|&k| kinds[k] == "[]");
    if only_successes && claims.len() <= 1 {
        return succeed_and_claim(pool, ops, &kinds[SUCCEEDED], now, &claims).await;
    }
    let mut tx = pool.begin().await?;
    let held: Vec<(String, i64)> = sqlx::query_as(SQL_HELD)
        .bind(&kinds[ALL])
        .fetch_all(&mut *tx)
        .await?;
    let applied: HashSet<(String, i64)> = held.into_iter().collect();
    if !applied.is_empty() {
        if kinds[SUCCEEDED] != "[]" {
            sqlx::query(SQL_RESULTS)
                .bind(&kinds[SUCCEEDED])
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        for (kind, sql) in [
            (SUCCEEDED, SQL_SUCCEED),
            (FAILED, SQL_FAIL),
            (RETRY, SQL_RETRY_LATER),
            (OOM, SQL_OOM),
            (CANCELLED, SQL_CANCELLED),
            (RELEASED, SQL_RELEASED),
        ] {
            if kinds[kind] != "[]" {
                sqlx::query(sql)
                    .bind(&kinds[kind])
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    let mut claimed = Vec::with_capacity(claims.len());
    for (owner, lease, slots) in &claims {
        let rows = sqlx::query(SQL_CLAIM)
            .bind(*owner)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(slots.len() as i64)
            .fetch_all(&mut *tx)
            .await?;
        claimed.push(claimed_in_order(&rows)?);
    }
    // Requeued work (OOM, release) is claimable by other hosts: wake them.
    if kinds[OOM] != "[]" || kinds[RELEASED] != "[]" {
        sqlx::query(SQL_NOTIFY)
            .bind(WAKE_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(outcomes(ops, &claims, &applied, claimed))
}

/// The common group (successes only, one claiming owner) in a single statement: one
/// round trip and one commit.
async fn succeed_and_claim(
    pool: &PgPool,
    ops: &[(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)],
    succeeded: &str,
    now: i64,
    claims: &[(&str, Duration, Vec<usize>)],
) -> StoreResult<Vec<FinishOutcome>> {
    let (owner, lease, slots) = match claims.first() {
        Some((owner, lease, slots)) => (*owner, *lease, slots.len()),
        None => ("", Duration::ZERO, 0),
    };
    let rows = sqlx::query(SQL_SUCCEED_AND_CLAIM)
        .bind(succeeded)
        .bind(now)
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(slots as i64)
        .fetch_all(pool)
        .await?;
    let mut applied = HashSet::new();
    let mut jobs = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if i == 0 {
            let text: String = row.try_get("applied")?;
            let pairs: Vec<(String, i64)> = serde_json::from_str(&text)
                .map_err(|e| StoreError::InvalidRow(format!("applied ops: {e}")))?;
            applied.extend(pairs);
        }
        if row.try_get::<Option<String>, _>("id")?.is_some() {
            jobs.push(job_from_row(row)?);
        }
    }
    jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
    let claimed = if claims.is_empty() {
        vec![]
    } else {
        vec![jobs]
    };
    Ok(outcomes(ops, claims, &applied, claimed))
}

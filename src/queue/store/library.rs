//! Library-run tables: the folder walk's per-file record, lookups of jobs by
//! content key, and the record of files `captiond export` wrote.

use std::collections::HashMap;

use sqlx::Row;
use uuid::Uuid;

use super::{SqliteStore, StoreError, StoreResult, job_from_row, parse_uuid};
use crate::queue::{Job, JobResult, JobState, now_ms};

const SQL_FILES_UNDER: &str =
    "SELECT path, size, mtime_ns, hash, is_image FROM library_files WHERE path >= ?1 AND path < ?2";
const SQL_PUT_FILES: &str = concat!(
    "INSERT INTO library_files (path, size, mtime_ns, hash, is_image, seen_at) ",
    "SELECT f ->> 'path', f ->> 'size', f ->> 'mtime_ns', f ->> 'hash', f ->> 'is_image', ?2 ",
    "FROM (SELECT value AS f FROM json_each(?1)) WHERE true ",
    "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, ",
    "hash = excluded.hash, is_image = excluded.is_image, seen_at = excluded.seen_at"
);
const SQL_FORGET_FILES: &str =
    "DELETE FROM library_files WHERE path IN (SELECT value FROM json_each(?1))";
const SQL_JOBS_BY_KEYS: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE idempotency_key IN (SELECT value FROM json_each(?1))"
);
const SQL_STATES_BY_IDS: &str =
    "SELECT id, state FROM jobs WHERE id IN (SELECT value FROM json_each(?1))";
const SQL_SUPERSEDE: &str = concat!(
    "UPDATE jobs SET idempotency_key = idempotency_key || '#' || id ",
    "WHERE idempotency_key IN (SELECT value FROM json_each(?1)) ",
    "AND state IN (SELECT value FROM json_each(?2))"
);
const SQL_RESULTS_BY_IDS: &str = "SELECT job_id, attempt, model, output, created_at FROM results WHERE job_id IN (SELECT value FROM json_each(?1))";
/// Succeeded jobs under current (not superseded) keys in a key range, grouped by the
/// settings that made their results.
const SQL_RESULT_SETTINGS: &str = concat!(
    "SELECT j.task, j.params, r.model, substr(j.idempotency_key, -16) AS tail, COUNT(*) ",
    "FROM jobs j JOIN results r ON r.job_id = j.id ",
    "WHERE j.idempotency_key >= ?1 AND j.idempotency_key < ?2 AND instr(j.idempotency_key, '#') = 0 ",
    "AND j.state = 'succeeded' GROUP BY j.task, j.params, r.model, tail ORDER BY COUNT(*) DESC, r.model, tail"
);
const SQL_GET_EXPORT: &str = "SELECT content_hash FROM export_files WHERE path = ?1";
const SQL_PUT_EXPORT: &str = concat!(
    "INSERT INTO export_files (path, content_hash, written_at) VALUES (?1, ?2, ?3) ",
    "ON CONFLICT(path) DO UPDATE SET content_hash = excluded.content_hash, written_at = excluded.written_at"
);

/// How many values one `json_each` statement carries.
const CHUNK: usize = 5_000;

/// What a library walk recorded about one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LibraryFile {
    /// Canonical path.
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// BLAKE3 of the content (hex); empty for files that are not images.
    pub hash: String,
    /// Whether the file was selected as an image (by extension or content).
    pub is_image: bool,
}

/// How many results one set of settings made: task, parameters (JSON), model and the
/// keys' last 16 characters (where a library key holds the digest of its settings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResultSettings {
    /// The jobs' task (`caption`, `query`, …).
    pub task: String,
    /// The jobs' parameters as stored (JSON).
    pub params: String,
    /// The model that made the results, as the worker named it.
    pub model: String,
    /// The last 16 characters of the jobs' idempotency keys.
    pub key_tail: String,
    /// How many succeeded jobs.
    pub jobs: i64,
}

impl From<(String, String, String, String, i64)> for ResultSettings {
    /// From a row of task, parameters, model, key tail and count.
    fn from((task, params, model, key_tail, jobs): (String, String, String, String, i64)) -> Self {
        Self {
            task,
            params,
            model,
            key_tail,
            jobs,
        }
    }
}

/// The smallest string greater than every string that starts with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut s = prefix.to_string();
    s.push(char::MAX);
    s
}

fn json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidRow(e.to_string()))
}

impl SqliteStore {
    /// Recorded files whose canonical path starts with `prefix` (a folder path ending
    /// in a separator, or one file's path).
    pub async fn library_files_under(&self, prefix: &str) -> StoreResult<Vec<LibraryFile>> {
        let rows = sqlx::query(SQL_FILES_UNDER)
            .bind(prefix)
            .bind(prefix_end(prefix))
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LibraryFile {
                    path: r.try_get(0)?,
                    size: r.try_get(1)?,
                    mtime_ns: r.try_get(2)?,
                    hash: r.try_get(3)?,
                    is_image: r.try_get::<i64, _>(4)? != 0,
                })
            })
            .collect()
    }

    /// Records (or updates) what the walk learnt about these files.
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
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    /// Forgets files the walk no longer finds (deleted or moved away).
    pub async fn forget_library_files(&self, paths: &[String]) -> StoreResult<()> {
        for chunk in paths.chunks(CHUNK) {
            sqlx::query(SQL_FORGET_FILES)
                .bind(json(&chunk)?)
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    /// The jobs holding these idempotency keys, by key.
    pub async fn jobs_by_keys(&self, keys: &[String]) -> StoreResult<HashMap<String, Job>> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            let rows = sqlx::query(SQL_JOBS_BY_KEYS)
                .bind(json(&chunk)?)
                .fetch_all(&self.read)
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

    /// Succeeded jobs whose idempotency key starts with `key_prefix` (superseded keys
    /// left out), counted per task, parameters and model; most first.
    pub async fn result_settings(&self, key_prefix: &str) -> StoreResult<Vec<ResultSettings>> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(SQL_RESULT_SETTINGS)
            .bind(key_prefix)
            .bind(prefix_end(key_prefix))
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().map(ResultSettings::from).collect())
    }

    /// Current states of these jobs (missing ids are left out).
    pub async fn job_states(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobState>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let strs: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows: Vec<(String, String)> = sqlx::query_as(SQL_STATES_BY_IDS)
                .bind(json(&strs)?)
                .fetch_all(&self.read)
                .await?;
            for (id, state) in rows {
                let st = JobState::parse(&state)
                    .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?;
                out.insert(parse_uuid(&id)?, st);
            }
        }
        Ok(out)
    }

    /// Frees these idempotency keys from jobs in one of `states` (the key gets the
    /// job id appended), so new jobs can take them; the old jobs and results stay.
    pub async fn supersede_keys(&self, keys: &[String], states: &[JobState]) -> StoreResult<u64> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let mut n = 0;
        for chunk in keys.chunks(CHUNK) {
            n += sqlx::query(SQL_SUPERSEDE)
                .bind(json(&chunk)?)
                .bind(json(&states)?)
                .execute(&self.write)
                .await?
                .rows_affected();
        }
        Ok(n)
    }

    /// Stored results of these jobs, by job id.
    pub async fn results_of(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobResult>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let strs: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows = sqlx::query(SQL_RESULTS_BY_IDS)
                .bind(json(&strs)?)
                .fetch_all(&self.read)
                .await?;
            for r in &rows {
                let id: String = r.try_get(0)?;
                let output: String = r.try_get(3)?;
                out.insert(
                    parse_uuid(&id)?,
                    JobResult {
                        attempt: r.try_get(1)?,
                        model: r.try_get(2)?,
                        output: serde_json::from_str(&output)
                            .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
                        created_at: r.try_get(4)?,
                    },
                );
            }
        }
        Ok(out)
    }

    /// BLAKE3 of what `captiond export` last wrote to `path`, if it wrote there.
    pub async fn export_record(&self, path: &str) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(SQL_GET_EXPORT)
            .bind(path)
            .fetch_optional(&self.read)
            .await?)
    }

    /// Remembers what `captiond export` wrote to `path`.
    pub async fn put_export_record(&self, path: &str, content_hash: &str) -> StoreResult<()> {
        sqlx::query(SQL_PUT_EXPORT)
            .bind(path)
            .bind(content_hash)
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        Ok(())
    }
}

-- The durable job queue on PostgreSQL (several hosts on one queue). The same tables as
-- the SQLite schema; times are Unix milliseconds, ids UUIDv7 text, counts BIGINT.

CREATE TABLE batches (
    id          TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    total       BIGINT NOT NULL
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    task             TEXT NOT NULL CHECK (task IN ('caption', 'query', 'detect', 'point')),
    params           TEXT NOT NULL,
    source_kind      TEXT NOT NULL CHECK (source_kind IN ('path', 'blob')),
    source           TEXT NOT NULL,
    priority         BIGINT NOT NULL DEFAULT 100,
    state            TEXT NOT NULL CHECK (state IN ('queued', 'scheduled', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt          BIGINT NOT NULL DEFAULT 0,
    max_attempts     BIGINT NOT NULL DEFAULT 5,
    oom_count        BIGINT NOT NULL DEFAULT 0,
    run_at           BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    idempotency_key  TEXT UNIQUE,
    batch_id         TEXT REFERENCES batches(id)
);

-- Runnable rows only, in claim order: what `FOR UPDATE SKIP LOCKED` walks.
CREATE INDEX jobs_runnable ON jobs (priority, run_at) WHERE state IN ('queued', 'scheduled');
CREATE INDEX jobs_due ON jobs (run_at) WHERE state IN ('queued', 'scheduled');
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_owner ON jobs (lease_owner) WHERE state = 'running';
CREATE INDEX jobs_batch ON jobs (batch_id, state);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE results (
    job_id      TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    attempt     BIGINT NOT NULL,
    model       TEXT NOT NULL,
    output      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE queue_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE calibrations (
    device               TEXT NOT NULL,
    model                TEXT NOT NULL,
    max_concurrency      BIGINT NOT NULL,
    per_generation_bytes BIGINT NOT NULL,
    baseline_used_bytes  BIGINT NOT NULL,
    total_bytes          BIGINT NOT NULL,
    measured_at          BIGINT NOT NULL,
    PRIMARY KEY (device, model)
);

CREATE TABLE library_files (
    path      TEXT PRIMARY KEY,
    size      BIGINT NOT NULL,
    mtime_ns  BIGINT NOT NULL,
    hash      TEXT NOT NULL,
    is_image  BIGINT NOT NULL,
    seen_at   BIGINT NOT NULL
);
CREATE INDEX library_files_hash ON library_files (hash) WHERE hash <> '';

CREATE TABLE export_files (
    path         TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    written_at   BIGINT NOT NULL
);

-- Uploaded images, content-addressed (BLAKE3 hex), readable by every host.
CREATE TABLE blobs (
    hash        TEXT PRIMARY KEY,
    bytes       BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

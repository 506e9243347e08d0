-- The durable job queue. Times are Unix milliseconds; ids are UUIDv7 text.

CREATE TABLE batches (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    total       INTEGER NOT NULL
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    task             TEXT NOT NULL CHECK (task IN ('caption', 'query', 'detect', 'point')),
    params           TEXT NOT NULL,            -- JSON: length, question, object, settings
    source_kind      TEXT NOT NULL CHECK (source_kind IN ('path', 'blob')),
    source           TEXT NOT NULL,            -- absolute path, or BLAKE3 hex of stored bytes
    priority         INTEGER NOT NULL DEFAULT 100,  -- lower runs first
    state            TEXT NOT NULL CHECK (state IN ('queued', 'scheduled', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 5,
    oom_count        INTEGER NOT NULL DEFAULT 0,
    run_at           INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    idempotency_key  TEXT UNIQUE,
    batch_id         TEXT REFERENCES batches(id)
);

-- Runnable rows only: what the claim statement scans, in claim order.
CREATE INDEX jobs_runnable ON jobs (priority, run_at) WHERE state IN ('queued', 'scheduled');
-- The earliest due time, for the dispatcher's timer.
CREATE INDEX jobs_due ON jobs (run_at) WHERE state IN ('queued', 'scheduled');
-- Leases the rescuer looks at.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_batch ON jobs (batch_id, state);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- One row per succeeded job, written in the same transaction as the transition.
CREATE TABLE results (
    job_id      TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    model       TEXT NOT NULL,
    output      TEXT NOT NULL,                 -- JSON
    created_at  INTEGER NOT NULL
);

-- Persistent switches such as the queue pause.
CREATE TABLE queue_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

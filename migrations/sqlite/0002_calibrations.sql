-- Warm-up calibration of the adaptive controller, per device and model.
CREATE TABLE calibrations (
    device               TEXT NOT NULL,
    model                TEXT NOT NULL,
    max_concurrency      INTEGER NOT NULL,
    per_generation_bytes INTEGER NOT NULL,
    baseline_used_bytes  INTEGER NOT NULL,
    total_bytes          INTEGER NOT NULL,
    measured_at          INTEGER NOT NULL,
    PRIMARY KEY (device, model)
);

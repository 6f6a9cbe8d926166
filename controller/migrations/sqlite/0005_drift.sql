-- Drift: each model's policy, the detectors' state per (model version, scope), the drift events
-- they recorded, and the retraining requests fired for them (one per drift episode).
CREATE TABLE drift_policies (
    model TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE drift_detectors (
    model_digest TEXT NOT NULL,
    scope TEXT NOT NULL,
    model_name TEXT NOT NULL,
    detector TEXT NOT NULL,
    chart TEXT,
    episode TEXT,
    drifting_since BIGINT,
    evaluation TEXT,
    evaluated_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (model_digest, scope)
);

CREATE TABLE drift_events (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX drift_events_model ON drift_events (model_name, at);

CREATE TABLE retrain_requests (
    event TEXT PRIMARY KEY REFERENCES drift_events (id),
    model_name TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    scope TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    finished_at BIGINT,
    detail TEXT
);

-- EdgeFleet controller schema (SQLite). Times are Unix milliseconds; JSON is stored as text.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    mac_key BLOB NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT,
    online BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT,
    status TEXT,
    active_digest TEXT,
    previous_digest TEXT,
    shadow_digest TEXT,
    assignment_seq BIGINT NOT NULL DEFAULT 0,
    assignment BLOB,
    assignment_json TEXT
);

CREATE TABLE enroll_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    used_by TEXT
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE models (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    release_counter BIGINT NOT NULL,
    signed_manifest BLOB NOT NULL,
    manifest_json TEXT NOT NULL,
    signatures BIGINT NOT NULL,
    bundle_size BIGINT NOT NULL,
    bundle_path TEXT NOT NULL,
    parent TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE reports (
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    sent_at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    model_digest TEXT,
    body TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX reports_device_kind ON reports (device, kind, seq);

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

-- Append-only: the application never updates or deletes audit rows. Someone with write access
-- to the file can still drop these triggers; `edgefleet audit verify` then finds the change.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- EdgeFleet controller schema (PostgreSQL). Times are Unix milliseconds; JSON is stored as text.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    mac_key BYTEA NOT NULL,
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
    assignment BYTEA,
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
    signed_manifest BYTEA NOT NULL,
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

-- Append-only: the application never updates or deletes audit rows. Someone with owner rights
-- can still drop this trigger; `edgefleet audit verify` then finds the change.
CREATE FUNCTION audit_log_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

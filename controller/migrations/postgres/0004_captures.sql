-- Data capture: the settings of each device that captures (no row: capture is off), and every
-- batch a device announced (with the size and SHA-256 its upload must match) and uploaded.
CREATE TABLE capture_settings (
    device TEXT PRIMARY KEY REFERENCES devices (id),
    settings TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE captures (
    device TEXT NOT NULL REFERENCES devices (id),
    batch BIGINT NOT NULL,
    model_digest TEXT NOT NULL,
    samples BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    first_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    noticed_at BIGINT NOT NULL,
    uploaded_at BIGINT,
    path TEXT,
    PRIMARY KEY (device, batch)
);
CREATE INDEX captures_model ON captures (model_digest, device, batch);

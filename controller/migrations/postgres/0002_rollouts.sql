-- Rollouts: the engine's state (JSON) with a version for compare-and-set, and the outbox of
-- actions committed with each state change and removed once carried out.
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    candidate TEXT NOT NULL REFERENCES models (digest),
    baseline TEXT NOT NULL REFERENCES models (digest),
    phase TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL,
    next_deadline BIGINT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE rollout_outbox (
    rollout TEXT NOT NULL REFERENCES rollouts (id),
    seq BIGINT NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (rollout, seq)
);

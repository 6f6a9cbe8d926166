-- Rollouts and A/B experiments share one table: `kind` names the engine whose state `state`
-- holds; `selector` is the label selector members were chosen by (JSON), so devices that start
-- matching it later can join. Audit rows are read per object (`rollout:<id>`) for status views.
ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'rollout';
ALTER TABLE rollouts ADD COLUMN selector TEXT NOT NULL DEFAULT '{}';
CREATE INDEX rollouts_phase ON rollouts (phase);
CREATE INDEX audit_log_object ON audit_log (object, seq);

-- Which NOTIFY payloads a replica understands. 1: a "peer" event names one
-- peer (the first release with replicas). 2: it may name up to 300, so a
-- burst of registrations costs one notification per batch. Replicas send
-- one ID per event while any live replica is still at 1 (a rolling
-- upgrade), so none misses a change.
ALTER TABLE replicas ADD COLUMN events smallint NOT NULL DEFAULT 1;

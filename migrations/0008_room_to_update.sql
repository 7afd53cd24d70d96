-- imprint-sync schema, version 8: room on each page for the row's own updates.
--
-- An outbox row is updated twice in its life (claimed, then written back); a customer's
-- claim record and sync state once per sync. On a full page (fillfactor 100, how a bulk
-- insert leaves it) every such update moves the row to another page: PostgreSQL then also
-- writes a lock record for the old version and logs the new version whole. With room left on
-- the page the new version stays beside the old one, its WAL record carries only the bytes
-- that changed, and the claim record's and sync state's updates (no indexed column changes)
-- are HOT: no index entry at all. Dead versions are pruned as pages are read.
--
-- Only pages filled from now on keep the room; existing pages keep theirs until rewritten
-- (VACUUM FULL, or retention emptying them). Storage parameters take no lock beyond a brief
-- SHARE UPDATE EXCLUSIVE and rewrite nothing.
ALTER TABLE imprint_sync.customer_outbox SET (fillfactor = 60);
ALTER TABLE imprint_sync.customer_claims SET (fillfactor = 70);
ALTER TABLE imprint_sync.customer_sync_state SET (fillfactor = 70);

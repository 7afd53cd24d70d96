-- The lease needs no index of its own: the rescue of expired leases reads the rows in flight
-- through customer_outbox_one_in_flight_idx (as many as the workers hold), so a claim writes
-- one index entry fewer. DROP INDEX takes a brief ACCESS EXCLUSIVE lock on the outbox (migrate
-- waits at most 3 s for it, then tries again); nothing is rewritten.
DROP INDEX IF EXISTS imprint_sync.customer_outbox_in_flight_lease_idx;

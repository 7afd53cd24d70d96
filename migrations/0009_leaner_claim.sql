-- The lease needs no index of its own: the rescue of expired leases reads the rows in flight
-- through customer_outbox_one_in_flight_idx (they are as many as the workers hold), and every
-- claim no longer writes an entry here. DROP INDEX takes a brief ACCESS EXCLUSIVE lock on the
-- outbox; nothing is rewritten.
DROP INDEX IF EXISTS imprint_sync.customer_outbox_in_flight_lease_idx;

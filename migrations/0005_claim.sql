-- imprint-sync schema, version 5: what the claim remembers per customer, and a count of
-- claims that never came back (poison rows). Forward-only; safe while older replicas run
-- (they ignore both).

-- Claims of this row since its last write-back. A row whose claims keep dying (the process
-- crashes or loses the lease on it) is claimed alone, and after `sync.max_claims` it is set
-- aside as failed / poison_row instead of crash-looping. Adding a column with a constant
-- default rewrites nothing.
ALTER TABLE imprint_sync.customer_outbox ADD COLUMN claims integer NOT NULL DEFAULT 0;

-- Per customer, written by the claim (and the write-back's quiet period):
--   marks      per column, the id of the newest outbox row whose value for that column was
--              claimed, and so maybe sent ({"email": 812, "phone": 907}). A row below a
--              column's mark never sends that column again (G2, per field, late commits too).
--   hold_until after a timeout or a broken connection, nothing is claimed for the customer
--              before this time (at least api.timeout_ms), so a request possibly still being
--              applied is never overtaken.
CREATE TABLE imprint_sync.customer_claims (
    customer_id  text PRIMARY KEY,
    marks        jsonb NOT NULL DEFAULT '{}'::jsonb,
    hold_until   timestamptz
);

-- Claim look-ups by customer must land on the customer indexes whatever the statistics say.
-- Without statistics (or with stale ones, right after a bulk import) every partial index on
-- `sync_status = 'pending'` looks empty, and the planner may scan the due index whole for a
-- look-up by customer. A second predicate that only the due scan states (a strict comparison
-- on next_attempt_at implies it) keeps the due index out of every other plan; likewise for
-- the lease index (the rescue compares lease_expires_at).
DROP INDEX imprint_sync.customer_outbox_due_idx;
CREATE INDEX customer_outbox_due_idx
    ON imprint_sync.customer_outbox (next_attempt_at, id)
    WHERE sync_status = 'pending' AND next_attempt_at IS NOT NULL;
DROP INDEX imprint_sync.customer_outbox_in_flight_lease_idx;
CREATE INDEX customer_outbox_in_flight_lease_idx
    ON imprint_sync.customer_outbox (lease_expires_at)
    WHERE sync_status = 'in_flight' AND lease_expires_at IS NOT NULL;

-- Per row, the age of each value a merge carried into it from an older row
-- ({"email": 812}): the id of the row the value came from. A carried value keeps its age, so a
-- retry or a replay of the carrier never passes it off as newer than a row committed since
-- (G2, G3). NULL (no rewrite) for rows no merge touched.
ALTER TABLE imprint_sync.customer_outbox ADD COLUMN origins jsonb;

-- No index holds every row any more: customer_outbox_customer_idx (every row by customer)
-- gives way to one for the settled rows (synced, superseded), which with the partial
-- indexes of the other states (pending, in flight, failed) finds a customer's rows in every
-- state. A partner's insert writes three index entries per row instead of four, and a claim
-- one fewer.
--
-- CREATE INDEX holds a SHARE lock while it builds: the partner's inserts wait. To avoid
-- that on a large outbox, build it yourself first, CONCURRENTLY, under this name and
-- definition; then this does nothing but the DROP. (An invalid index left by such a build
-- given up half way is rebuilt here.)
CREATE INDEX IF NOT EXISTS customer_outbox_settled_customer_idx
    ON imprint_sync.customer_outbox (customer_id, id)
    WHERE sync_status IN ('synced', 'superseded');

DO $rebuild$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
                WHERE indexrelid = 'imprint_sync.customer_outbox_settled_customer_idx'::regclass
                  AND NOT indisvalid) THEN
        REINDEX INDEX imprint_sync.customer_outbox_settled_customer_idx;
    END IF;
END
$rebuild$;

DROP INDEX IF EXISTS imprint_sync.customer_outbox_customer_idx;

-- 0010 kept an index made beforehand under the name customer_outbox_settled_customer_idx
-- whatever its definition (a DBA's CREATE INDEX CONCURRENTLY with, say, only 'synced' in the
-- predicate), and dropped the index of every row: a customer's settled rows were then found
-- only by scanning the outbox. Such an index is built again here as 0010 defines it (a SHARE
-- lock on the outbox while it builds, as 0010's own build); one made as defined, or by 0010,
-- is left alone. Safe to run again.
DO $as_defined$
DECLARE
    path text := current_setting('search_path');
    made text;
    valid boolean;
BEGIN
    -- Read with pg_catalog alone on the path, so the definition names the outbox's schema
    -- whatever the migrating connection's search_path.
    PERFORM set_config('search_path', 'pg_catalog', true);
    SELECT pg_get_indexdef(i.indexrelid), i.indisvalid INTO made, valid
      FROM pg_index i
     WHERE i.indexrelid = to_regclass('imprint_sync.customer_outbox_settled_customer_idx');
    PERFORM set_config('search_path', path, true);
    IF made IS NOT DISTINCT FROM
           'CREATE INDEX customer_outbox_settled_customer_idx ON imprint_sync.customer_outbox '
           'USING btree (customer_id, id) '
           'WHERE (sync_status = ANY (ARRAY[''synced''::text, ''superseded''::text]))'
       AND valid THEN
        RETURN;
    END IF;
    DROP INDEX IF EXISTS imprint_sync.customer_outbox_settled_customer_idx;
    CREATE INDEX customer_outbox_settled_customer_idx
        ON imprint_sync.customer_outbox (customer_id, id)
        WHERE sync_status IN ('synced', 'superseded');
END
$as_defined$;

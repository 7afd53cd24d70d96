-- A customer's settled rows are found through customer_outbox_settled_customer_idx (0010), and
-- through nothing else whatever the statistics. Safe to run again: each index that is already
-- as defined here is left alone.
--
-- 1. 0010 kept an index made beforehand under the settled index's name whatever its
--    definition (a DBA's CREATE INDEX CONCURRENTLY with, say, only 'synced' in the
--    predicate): a customer's settled rows were then found only by scanning the outbox.
-- 2. The retention index had the settled index's predicate alone, so with statistics taken
--    while the rows were pending (a bulk import analyzed before it was synced) it looked as
--    cheap for a look-up by customer, which then read every settled row through it. A second
--    predicate that only retention states (its strict comparison on updated_at implies it)
--    keeps it out of every other plan, as 0005 did for the due index.
--
-- Each index not as defined is built again, holding a SHARE lock on the outbox (the
-- partner's inserts wait, about 1.8 s per million settled rows). To avoid the wait, build
-- it yourself first, CONCURRENTLY, under its name and definition below.
DO $as_defined$
DECLARE
    path text := current_setting('search_path');
    want record;
    made text;
    valid boolean;
BEGIN
    FOR want IN
        SELECT * FROM (VALUES
            ('customer_outbox_settled_customer_idx', '(customer_id, id)',
             'sync_status IN (''synced'', ''superseded'')',
             'CREATE INDEX customer_outbox_settled_customer_idx ON imprint_sync.customer_outbox '
             'USING btree (customer_id, id) '
             'WHERE (sync_status = ANY (ARRAY[''synced''::text, ''superseded''::text]))'),
            ('customer_outbox_finished_idx', '(updated_at)',
             'sync_status IN (''synced'', ''superseded'') AND updated_at IS NOT NULL',
             'CREATE INDEX customer_outbox_finished_idx ON imprint_sync.customer_outbox '
             'USING btree (updated_at) '
             'WHERE ((sync_status = ANY (ARRAY[''synced''::text, ''superseded''::text])) '
             'AND (updated_at IS NOT NULL))')
        ) AS w(name, columns, predicate, definition)
    LOOP
        -- Read with pg_catalog alone on the path, so the definition names the outbox's
        -- schema whatever the migrating connection's search_path.
        PERFORM set_config('search_path', 'pg_catalog', true);
        made := NULL;
        valid := NULL;
        SELECT pg_get_indexdef(i.indexrelid), i.indisvalid INTO made, valid
          FROM pg_index i
         WHERE i.indexrelid = to_regclass('imprint_sync.' || want.name);
        PERFORM set_config('search_path', path, true);
        CONTINUE WHEN made IS NOT DISTINCT FROM want.definition AND valid;
        EXECUTE format('DROP INDEX IF EXISTS imprint_sync.%I', want.name);
        EXECUTE format('CREATE INDEX %I ON imprint_sync.customer_outbox %s WHERE %s',
                       want.name, want.columns, want.predicate);
    END LOOP;
END
$as_defined$;

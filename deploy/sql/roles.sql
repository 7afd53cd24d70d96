-- imprint-sync: least-privilege roles. Run once per database, as a superuser or as the role
-- that owns the database (psql -v ON_ERROR_STOP=1 -d <database> -f roles.sql). Idempotent:
-- running it again changes nothing, and it may run before or after `imprint-sync migrate`.
--
--   imprint_sync_migrator  owns the imprint_sync schema and everything in it; used only by
--                          `imprint-sync migrate` (ExecStartPre, the init container).
--   imprint_sync_daemon    what `run` and `status` need, table by table (step 4): no DDL,
--                          no TRUNCATE, no outbox INSERT, no rewriting the migrations.
--   imprint_sync_writer    a group role for the partner's writers: INSERT of the partner's
--                          columns of the outbox, nothing else. NOLOGIN: grant it to the
--                          partner's application roles (GRANT imprint_sync_writer TO
--                          partner_app;). It also covers the
--                          enqueue_customer_change() trigger on the partner's own table, which
--                          inserts with the privileges of the writing role.
--
-- Roles are cluster-wide; the grants below are per database. Passwords are not set here:
--   ALTER ROLE imprint_sync_migrator PASSWORD '...';  ALTER ROLE imprint_sync_daemon PASSWORD '...';

-- 1. Roles (created only when missing; existing ones keep their attributes and passwords).
DO $roles$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES
            ('imprint_sync_migrator', 'LOGIN'),
            ('imprint_sync_daemon', 'LOGIN'),
            ('imprint_sync_writer', 'NOLOGIN')) AS t(name, login)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I %s NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION',
                               r.name, r.login);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created concurrently by another session: fine
            END;
        END IF;
    END LOOP;
END
$roles$;

-- 2. The database: everyone may connect; the migrator may create the schema (the
--    migrations run CREATE SCHEMA IF NOT EXISTS, which checks this privilege even when the
--    schema exists). The database name is not known in advance, hence EXECUTE.
DO $database$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO imprint_sync_migrator, imprint_sync_daemon, imprint_sync_writer',
                   current_database());
    EXECUTE format('GRANT CREATE ON DATABASE %I TO imprint_sync_migrator', current_database());
END
$database$;

-- 3. The schema, owned by the migrator.
CREATE SCHEMA IF NOT EXISTS imprint_sync AUTHORIZATION imprint_sync_migrator;
ALTER SCHEMA imprint_sync OWNER TO imprint_sync_migrator;
REVOKE ALL ON SCHEMA imprint_sync FROM PUBLIC;
GRANT USAGE ON SCHEMA imprint_sync TO imprint_sync_daemon, imprint_sync_writer;

-- 4. The daemon: exactly the statements `run` and `status` make, table by table.
--    customer_outbox      read, claim and write back (UPDATE), retention (DELETE); INSERT
--                         of the partner's columns only, for `reconcile --repair` (a row
--                         holding the profile Imprint accepted); never the daemon's columns.
--    customer_sync_state  read and upsert; never DELETE.
--    customer_claims      read and upsert (per-column marks, the quiet period); never DELETE.
--    sync_attempts        append (INSERT) and retention (DELETE); never UPDATE: it is a log.
--    workers              the heartbeat: upsert, and forget dead replicas.
--    reconcile_runs       append (INSERT) a summary per `reconcile` run; read by `status`.
--    _sqlx_migrations     read only (the check at start); `migrate` runs as the migrator.
--    No sequence privilege: the identity columns need none.
-- Tables the migrator creates later get rows-only grants by default (step 6); these revoke
-- what those defaults gave beyond the list above. One DO block, so a running daemon never
-- sees a moment without its grants. Skipped for tables that do not exist yet (first run).
DO $daemon$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
            ('customer_outbox', 'SELECT, UPDATE, DELETE'),
            ('customer_sync_state', 'SELECT, INSERT, UPDATE'),
            ('customer_claims', 'SELECT, INSERT, UPDATE'),
            ('sync_attempts', 'SELECT, INSERT, DELETE'),
            ('workers', 'SELECT, INSERT, UPDATE, DELETE'),
            ('reconcile_runs', 'SELECT, INSERT'),
            ('_sqlx_migrations', 'SELECT')) AS v(name, privileges)
    LOOP
        IF to_regclass(format('imprint_sync.%I', t.name)) IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON imprint_sync.%I FROM imprint_sync_daemon', t.name);
            EXECUTE format('GRANT %s ON imprint_sync.%I TO imprint_sync_daemon',
                           t.privileges, t.name);
        END IF;
    END LOOP;
    IF to_regclass('imprint_sync.customer_outbox') IS NOT NULL THEN
        GRANT INSERT (customer_id, email, phone, first_name, last_name, preferred_language,
                      street_line1, street_line2, city, state, postal_code, country,
                      account_tenure, ltv_amount, ltv_currency, loyalty_tier,
                      account_created_at, transaction_count, metadata)
            ON imprint_sync.customer_outbox TO imprint_sync_daemon;
    END IF;
    FOR t IN SELECT s.seq FROM (VALUES
            (pg_get_serial_sequence('imprint_sync.customer_outbox', 'id')),
            (pg_get_serial_sequence('imprint_sync.sync_attempts', 'id'))) AS s(seq)
             WHERE to_regclass('imprint_sync.customer_outbox') IS NOT NULL AND s.seq IS NOT NULL
    LOOP
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM imprint_sync_daemon', t.seq);
    END LOOP;
END
$daemon$;

-- 5. The partner's writers: INSERT of the partner's columns of the outbox, nothing else.
--    Not `id` (an identity), nor `enqueued_at`, `sync_status`, the lease or any other column
--    the daemon works with: a writer that set them could wedge a customer, reorder its
--    changes or hide rows. No SELECT either, so no RETURNING.
DO $writer$
BEGIN
    IF to_regclass('imprint_sync.customer_outbox') IS NOT NULL THEN
        REVOKE ALL ON imprint_sync.customer_outbox FROM imprint_sync_writer;
        GRANT INSERT (customer_id, email, phone, first_name, last_name, preferred_language,
                      street_line1, street_line2, city, state, postal_code, country,
                      account_tenure, ltv_amount, ltv_currency, loyalty_tier,
                      account_created_at, transaction_count, metadata)
            ON imprint_sync.customer_outbox TO imprint_sync_writer;
    END IF;
END
$writer$;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA imprint_sync FROM imprint_sync_writer;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imprint_sync TO imprint_sync_writer;

-- 6. Objects the migrator creates later (the next migrations): rows for the daemon, nothing
--    for the writers. Run this script again after `migrate` to narrow them as above.
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO imprint_sync_daemon;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT USAGE, SELECT ON SEQUENCES TO imprint_sync_daemon;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    REVOKE USAGE ON SEQUENCES FROM imprint_sync_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT EXECUTE ON FUNCTIONS TO imprint_sync_writer;

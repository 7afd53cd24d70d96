-- imprint-sync: least-privilege roles. Run once per database, as a superuser or as the role
-- that owns the database (psql -v ON_ERROR_STOP=1 -d <database> -f roles.sql). Idempotent:
-- running it again changes nothing, and it may run before or after `imprint-sync migrate`.
--
--   imprint_sync_migrator  owns the imprint_sync schema and everything in it; used only by
--                          `imprint-sync migrate` (ExecStartPre, the init container).
--   imprint_sync_daemon    what `run` and `status` need: read and write the rows of the
--                          schema's tables, nothing else (no DDL, no TRUNCATE).
--   imprint_sync_writer    a group role for the partner's writers: INSERT into the outbox,
--                          nothing else. NOLOGIN: grant it to the partner's application roles
--                          (GRANT imprint_sync_writer TO partner_app;). It also covers the
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

-- 4. The daemon: rows of every table (outbox, customer_sync_state, sync_attempts, workers,
--    and the migration bookkeeping it checks at start), sequences, functions.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA imprint_sync TO imprint_sync_daemon;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA imprint_sync TO imprint_sync_daemon;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imprint_sync TO imprint_sync_daemon;

-- 5. The partner's writers: insert into the outbox only. No SELECT, so no RETURNING either.
DO $writer$
BEGIN
    IF to_regclass('imprint_sync.customer_outbox') IS NOT NULL THEN
        GRANT INSERT ON imprint_sync.customer_outbox TO imprint_sync_writer;
    END IF;
END
$writer$;
-- Identity columns need no sequence privilege; this covers a serial column should one appear.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA imprint_sync TO imprint_sync_writer;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imprint_sync TO imprint_sync_writer;

-- 6. Objects the migrator creates later (the next migrations) get the same grants.
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO imprint_sync_daemon;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT USAGE, SELECT ON SEQUENCES TO imprint_sync_daemon;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT USAGE ON SEQUENCES TO imprint_sync_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE imprint_sync_migrator IN SCHEMA imprint_sync
    GRANT EXECUTE ON FUNCTIONS TO imprint_sync_daemon, imprint_sync_writer;

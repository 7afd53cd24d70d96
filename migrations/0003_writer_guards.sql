-- no-transaction
-- imprint-sync schema, version 3: the partner's writers cannot break the daemon.
--
-- * `id` is GENERATED ALWAYS: an explicit id (a huge one supersedes every later change, a
--   low one collides with the sequence later) is refused unless OVERRIDING SYSTEM VALUE is
--   said, which the writer role's column grants (deploy/sql/roles.sql) do not allow anyway.
--   Explicit ids inserted before are moved behind the sequence.
-- * An `in_flight` row must carry a lease: one without could never be rescued and would
--   block its customer forever. Rows already in that state are put back to `pending`.
--
-- Safe on a large, busy outbox: the first transaction changes only the catalog and the few
-- in-flight rows (their partial index), holding its lock for milliseconds; the constraint
-- is then validated in a transaction of its own, whose lock lets inserts and the daemon go
-- on. Every step may run again: a run stopped half way is finished by the next one.
BEGIN;

ALTER TABLE imprint_sync.customer_outbox ALTER COLUMN id SET GENERATED ALWAYS;

DO $constraint$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conname = 'customer_outbox_in_flight_has_lease'
                      AND conrelid = 'imprint_sync.customer_outbox'::regclass) THEN
        -- NOT VALID: checked for every new or changed row from now on, without a scan.
        ALTER TABLE imprint_sync.customer_outbox
            ADD CONSTRAINT customer_outbox_in_flight_has_lease
            CHECK (sync_status <> 'in_flight'
                   OR (lease_expires_at IS NOT NULL AND leased_by IS NOT NULL))
            NOT VALID;
    END IF;
END
$constraint$;

-- The rows a writer left in flight without a lease: due again, as a rescue would make them.
UPDATE imprint_sync.customer_outbox
SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL, updated_at = now()
WHERE sync_status = 'in_flight' AND (lease_expires_at IS NULL OR leased_by IS NULL);

-- Explicit ids already inserted ahead of the sequence would make a later ordinary insert
-- fail on the primary key: move the sequence past them.
DO $sequence$
DECLARE
    seq  text   := pg_get_serial_sequence('imprint_sync.customer_outbox', 'id');
    high bigint := (SELECT max(id) FROM imprint_sync.customer_outbox);
BEGIN
    IF high IS NOT NULL THEN
        PERFORM setval(seq, GREATEST(high, nextval(seq)));
    END IF;
END
$sequence$;

COMMIT;

ALTER TABLE imprint_sync.customer_outbox VALIDATE CONSTRAINT customer_outbox_in_flight_has_lease;

-- Reconciliation: what the last comparison of Imprint's copy with the partner's newest synced
-- profile found, per customer, and a summary of each `imprint-sync reconcile` run.
-- Forward-only; adding nullable columns without a default rewrites nothing, so old replicas
-- keep running while this is applied.

ALTER TABLE imprint_sync.customer_sync_state
    -- When reconciliation last took the customer up (whatever came of it): the sweep and the
    -- command walk customers least recently checked first, so a restart goes on where it
    -- stopped.
    ADD COLUMN checked_at       timestamptz,
    -- When Imprint last answered a check (in_step, drifted or missing; an error does not
    -- verify anything).
    ADD COLUMN verified_at      timestamptz,
    -- in_step | drifted | missing | error: what the last check found. `drift` then holds the
    -- drifted field names (a JSON array), never values.
    ADD COLUMN reconcile_result text
        CHECK (reconcile_result IN ('in_step', 'drifted', 'missing', 'error'));

-- The walk order: never-checked customers first, then the least recently checked.
CREATE INDEX customer_sync_state_checked_idx
    ON imprint_sync.customer_sync_state (checked_at NULLS FIRST, customer_id);

-- `status` counts customers drifted and missing now without reading every customer.
CREATE INDEX customer_sync_state_unreconciled_idx
    ON imprint_sync.customer_sync_state (reconcile_result)
    WHERE reconcile_result IN ('drifted', 'missing');

-- One row per `imprint-sync reconcile` run: `status` shows the last one.
CREATE TABLE imprint_sync.reconcile_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    repair       boolean NOT NULL,
    checked      bigint NOT NULL,
    in_step      bigint NOT NULL,
    drifted      bigint NOT NULL,
    missing      bigint NOT NULL,
    errors       bigint NOT NULL,
    repaired     bigint NOT NULL
);

-- imprint-sync schema, version 4: what Imprint has accepted, per column.
-- `accepted` is a flat object keyed by outbox column name (email, phone, ..., country,
-- ltv_amount, metadata) holding, for each column ever sent, the newest value Imprint
-- accepted, in the mapped form that was sent (phone E.164, country alpha-3). Every synced
-- write-back merges the request's columns into it (`accepted || sent`), so an older row's
-- e-mail survives a newer row that only changed the phone. Reconciliation compares it with
-- Imprint's copy. Nullable and without default: adding it rewrites nothing.
ALTER TABLE imprint_sync.customer_sync_state ADD COLUMN accepted jsonb;

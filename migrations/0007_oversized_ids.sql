-- imprint-sync schema, version 7: an oversized customer_id never fails the partner's insert.
--
-- The outbox indexes customer_id, and a btree refuses an index row over ~2.7 KB ("index row
-- size exceeds btree maximum"): a partner's id that long made the INSERT fail, directly or
-- through enqueue_customer_change() (cancelling the partner's own write), breaking "the
-- insert never fails". An id over 255 bytes can never be valid (the daemon allows at most
-- 64 characters of [A-Za-z0-9_-]), so it is replaced by a short marker before the row is
-- stored: 'oversized:' || md5 || ':' || its length in bytes. The marker holds ':',
-- which the daemon's id check refuses, so the row fails alone as invalid_profile naming
-- customer_id, and the digest and length let the partner find the row it came from.
--
-- The function is plain (SECURITY INVOKER): it only rewrites NEW, so it needs no privilege
-- of its own, and the writer role's column grants are unchanged.
CREATE FUNCTION imprint_sync.bound_customer_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF octet_length(NEW.customer_id) > 255 THEN
        NEW.customer_id := 'oversized:' || md5(NEW.customer_id) || ':'
                           || octet_length(NEW.customer_id);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER customer_outbox_bound_customer_id
    BEFORE INSERT ON imprint_sync.customer_outbox
    FOR EACH ROW EXECUTE FUNCTION imprint_sync.bound_customer_id();

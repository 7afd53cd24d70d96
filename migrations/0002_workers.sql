-- Live daemon processes, for sharing the deployment's rate limit and for `status`.
-- Each process upserts its row every few seconds; rows silent for 15 s are dead.
CREATE TABLE imprint_sync.workers (
    worker_id     text PRIMARY KEY,
    hostname      text NOT NULL,
    version       text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

//! Background duties of a running engine: LISTEN for new rows, heartbeat (live replicas and
//! the rate share), rescue of expired leases, and retention.
//!
//! The rate share follows the live replicas closely: a replica that joins or leaves says so on
//! the workers channel, and every replica counts again at once, instead of at its next beat.
//! So the deployment's total stays at the configured rate when replicas come and go (within
//! a database round trip); a replica that dies silently is forgotten after the replica TTL.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::backoff::Backoff;
use crate::outbox::{CHANNEL, WORKERS_CHANNEL};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Rows deleted per retention statement: small, so no statement holds locks for long.
const PRUNE_BATCH: i64 = 1_000;

pub(crate) async fn run(shared: Arc<Shared>, wake: Arc<Notify>, stop: CancellationToken) {
    let replicas_changed = Arc::new(Notify::new());
    let nudge = Arc::new(Notify::new());
    let coalescer = tokio::spawn(coalesce(shared.clone(), nudge.clone(), wake.clone()));
    let listener = tokio::spawn(listen(
        shared.clone(),
        nudge,
        replicas_changed.clone(),
        stop.clone(),
    ));
    let rescue_every =
        (shared.settings.lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(15));
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut rescue = tokio::time::interval(rescue_every);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    let host = super::hostname();
    let mut db = Backoff::new("heartbeat and lease rescue");
    let mut pruning: Option<tokio::task::JoinHandle<()>> = None;
    let mut announced = false;
    loop {
        let beat = tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => true,
            _ = replicas_changed.notified() => true,
            _ = rescue.tick() => {
                match shared.db(shared.store.rescue_expired()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(rows = n, "rows whose lease expired are pending again");
                        wake.notify_one();
                    }
                    Err(e) => { db.failed(&e, &shared.health); }
                }
                false
            }
            // Retention runs beside the heartbeat, never in its way.
            _ = prune.tick() => {
                if pruning.as_ref().is_none_or(|p| p.is_finished()) {
                    pruning = Some(tokio::spawn(prune_all(shared.clone(), stop.clone())));
                }
                false
            }
        };
        if !beat {
            continue;
        }
        match shared.db(shared.store.heartbeat(&host)).await {
            Ok(live) => {
                db.succeeded(&shared.health);
                shared.health.replicas.store(live.into(), Ordering::Relaxed);
                shared.traffic.rate.set_replicas(live);
                metrics::gauge!("imprint_sync_replicas_live").set(f64::from(live));
                metrics::gauge!("imprint_sync_rate_limit_effective_rps")
                    .set(shared.traffic.rate.effective());
                if !announced {
                    // Tell the others to count again now, not at their next beat.
                    announced = shared.db(shared.store.announce()).await.is_ok();
                }
            }
            Err(e) => {
                db.failed(&e, &shared.health);
            }
        }
    }
    listener.abort();
    coalescer.abort();
}

async fn prune_all(shared: Arc<Shared>, stop: CancellationToken) {
    let s = &shared.settings;
    let mut total = 0;
    while !stop.is_cancelled() {
        match shared
            .store
            .prune(s.synced_days, s.attempts_days, PRUNE_BATCH)
            .await
        {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                tracing::warn!(error = %e, "retention paused until the next round");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            "retention deleted old synced, superseded and attempt rows"
        );
    }
}

/// The least time between two wake-ups of the claimer by NOTIFY while they find nothing. Any
/// role that can connect may NOTIFY the channel in a loop; unbounded, each notification cost
/// an empty claim, back to back. A claim that found rows does not wait for a wake-up, so
/// this never slows a backlog; a single insert after a quiet spell still wakes the claimer
/// at once.
const MIN_WAKE_GAP: Duration = Duration::from_millis(50);

/// Passes NOTIFY wake-ups (`nudge`) on to the claimer (`wake`). After a wake-up whose claim
/// took nothing, the next one waits until [`MIN_WAKE_GAP`] has passed (notifications that
/// come meanwhile are one wake-up at its end); after a claim that took rows, the next
/// notification is a real insert as likely as not, and is passed on at once. So a storm of
/// empty notifications costs at most one claim per gap (plus one per claim that took rows),
/// and a steady trickle of inserts (one every 20 ms, say) is claimed as each arrives.
async fn coalesce(shared: Arc<Shared>, nudge: Arc<Notify>, wake: Arc<Notify>) {
    loop {
        nudge.notified().await;
        wake.notify_one();
        tokio::select! {
            _ = tokio::time::sleep(MIN_WAKE_GAP) => {}
            _ = shared.took_rows.notified() => {}
        }
    }
}

/// LISTEN on the outbox channel (notifications wake the claimer, coalesced) and on the
/// workers channel (a replica joined or left: count again). sqlx's listener reconnects and
/// LISTENs again by itself; errors are waited out with backoff.
async fn listen(
    shared: Arc<Shared>,
    nudge: Arc<Notify>,
    replicas_changed: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new("listening for new rows");
    let mut listener: Option<PgListener> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let l = match &mut listener {
            Some(l) => l,
            None => match PgListener::connect_with(shared.store.pool()).await {
                Ok(mut l) => match l.listen_all([CHANNEL, WORKERS_CHANNEL]).await {
                    Ok(()) => {
                        // A replica may have joined while we were not listening.
                        replicas_changed.notify_one();
                        listener.insert(l)
                    }
                    Err(e) => {
                        tokio::time::sleep(backoff.failed(&e, &shared.health)).await;
                        continue;
                    }
                },
                Err(e) => {
                    tokio::time::sleep(backoff.failed(&e, &shared.health)).await;
                    continue;
                }
            },
        };
        match l.recv().await {
            Ok(n) if n.channel() == WORKERS_CHANNEL => {
                backoff.succeeded(&shared.health);
                replicas_changed.notify_one();
            }
            Ok(_) => {
                backoff.succeeded(&shared.health);
                nudge.notify_one();
            }
            Err(e) => {
                // Rows may have arrived, and replicas come or gone, while we were deaf: look
                // once the wait is over.
                let delay = backoff.failed(&e, &shared.health);
                tokio::time::sleep(delay).await;
                nudge.notify_one();
                replicas_changed.notify_one();
            }
        }
    }
}

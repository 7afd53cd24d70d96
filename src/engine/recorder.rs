//! The recorder: writes outcomes back in batches (one statement per batch), and frees each
//! row's window slot once its outcome is in the database.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::sync::mpsc::Receiver;

use super::Shared;
use super::backoff::Backoff;
use super::worker::Done;
use crate::labels::RowOutcome;
use crate::outbox::outcome::ErrorCode;
use crate::outbox::record::{Disposition, Record};
use crate::profile::LogId;

/// Most records written by one statement.
const MAX_BATCH: usize = 1_000;

pub(crate) async fn run(shared: Arc<Shared>, mut rx: Receiver<Done>, wake: Arc<Notify>) {
    let mut batch: Vec<Done> = Vec::with_capacity(MAX_BATCH);
    let mut backoff = Backoff::new("writing outcomes back");
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // The window slots go with the records: freed once the batch is written.
        let (records, slots): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|d| (d.record, d._permit)).unzip();
        let applied = match write(&shared, &records, &mut backoff, &rx).await {
            Some(Ok(applied)) => applied,
            // The database refused something in the batch: write the outcomes one by one,
            // so one bad outcome never stops the others (G7).
            Some(Err(_)) => {
                let mut applied = Vec::new();
                for r in &records {
                    match write(&shared, std::slice::from_ref(r), &mut backoff, &rx).await {
                        Some(Ok(a)) => applied.extend(a),
                        Some(Err(e)) => tracing::error!(
                            outbox_id = r.id,
                            customer_id = %LogId(&r.customer_id),
                            sqlstate = e.as_database_error().and_then(|d| d.code()).as_deref().unwrap_or("-"),
                            "the database refused this row's outcome; the row is taken again when its lease expires"
                        ),
                        None => return,
                    }
                }
                applied
            }
            None => return,
        };
        count(&records, &applied);
        drop(slots);
        wake.notify_one();
    }
}

/// Writes `records`. A refusal of the data is returned; anything else may pass (an outage,
/// a failover to a read-only node: 25006, 55000, ...) and is waited out with the outcomes
/// kept: the rows' leases keep them ours meanwhile, and a lost lease makes the write a no-op.
/// Dropping them would send those rows again once their leases expire. `None`: the process
/// is stopping with them unwritten.
async fn write(
    shared: &Shared,
    records: &[Record],
    backoff: &mut Backoff,
    rx: &Receiver<Done>,
) -> Option<sqlx::Result<Vec<crate::outbox::record::Applied>>> {
    loop {
        match shared.db(shared.store.record(records)).await {
            Ok(applied) => {
                backoff.succeeded(&shared.health);
                return Some(Ok(applied));
            }
            Err(e) if refused(&e) => return Some(Err(e)),
            Err(e) => {
                let delay = backoff.failed(&e, &shared.health);
                if shared.hard_stop.is_cancelled() && shared.stop.is_cancelled() && rx.is_closed() {
                    tracing::warn!(
                        rows = records.len(),
                        "stopping with outcomes unwritten; their rows are taken again when their leases expire"
                    );
                    return None;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn count(records: &[Record], applied: &[crate::outbox::record::Applied]) {
    for a in applied {
        if let Some(lag) = a.lag_seconds {
            metrics::histogram!("imprint_sync_sync_lag_seconds").record(lag);
        }
    }
    let applied_ids: std::collections::HashSet<i64> = applied.iter().map(|a| a.id).collect();
    for r in records {
        let invalid = r.error_code.as_deref() == Some(ErrorCode::InvalidProfile.as_str());
        let outcome = match &r.disposition {
            Disposition::Synced { .. } => RowOutcome::Synced,
            Disposition::Failed { .. } if invalid => RowOutcome::Invalid,
            Disposition::Failed { .. } => RowOutcome::Failed,
            Disposition::Retry { .. } => RowOutcome::Retried,
            Disposition::Release => continue,
        };
        if !applied_ids.contains(&r.id) {
            tracing::warn!(outbox_id = r.id, customer_id = %LogId(&r.customer_id), outcome = outcome.as_str(), "outcome not written: the row's lease had passed to another worker");
            continue;
        }
        outcome.count(1);
    }
}

/// A refusal of the data itself: SQLSTATE class 22 (data exception), 23 (integrity
/// constraint violation), 54 (program limit exceeded, e.g. an index row too large), or an
/// error a trigger on the outbox raised about this row (P0 `RAISE`, 09 triggered action,
/// 27 triggered data change, 2F/38/39 routine exceptions, 44 check option). Only these are
/// worth writing the batch row by row; everything else (an outage, a read-only node, a
/// revoked grant) says nothing against an outcome and is waited out. Waiting out a refusal
/// of one row would hold back every outcome behind it.
fn refused(e: &sqlx::Error) -> bool {
    const REFUSALS: [&str; 10] = ["22", "23", "54", "P0", "09", "27", "2F", "38", "39", "44"];
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| REFUSALS.iter().any(|class| c.starts_with(class)))
}

//! One claimed row: map it, send it (through the traffic gate), and turn the answer into a
//! record for the recorder.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use crate::imprint::UpdateCustomerRequest;
use crate::imprint::error::Answer;
use crate::imprint::model::json_text;
use crate::outbox::model::OutboxRow;
use crate::outbox::record::{AttemptLog, Disposition, Record};
use crate::profile;
use crate::traffic::{Admit, retry};

/// Time kept free between a request's timeout and its lease running out.
const LEASE_SAFETY: Duration = Duration::from_secs(1);

pub(crate) struct Job {
    pub row: OutboxRow,
    pub claimed_at: Instant,
    /// The row's slot in the claim window, freed once its record is written.
    pub permit: OwnedSemaphorePermit,
}

/// A worked row on its way to the recorder.
pub(crate) struct Done {
    pub record: Record,
    /// Held until the record is written.
    pub _permit: OwnedSemaphorePermit,
}

pub(crate) async fn work(shared: Arc<Shared>, job: Job, tx: tokio::sync::mpsc::Sender<Done>) {
    let span = tracing::info_span!(
        "row",
        outbox_id = job.row.id,
        customer_id = %profile::LogId(&job.row.customer_id)
    );
    let Some(record) = process(&shared, &job.row, job.claimed_at)
        .instrument(span)
        .await
    else {
        return; // cut off mid-request: the lease brings the row back
    };
    let done = Done {
        record,
        _permit: job.permit,
    };
    // The recorder outlives every worker; a send error means the process is going down
    // hard, and the lease brings the row back.
    let _ = tx.send(done).await;
}

async fn process(shared: &Shared, row: &OutboxRow, claimed_at: Instant) -> Option<Record> {
    let request = match profile::map_row(row) {
        Ok(r) => r,
        Err(e) => {
            // A row that fails here fails the run too (`run --once` exits 1).
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                outbox_id = row.id,
                customer_id = %profile::LogId(&row.customer_id),
                error_code = "invalid_profile",
                field = e.field,
                "row cannot be mapped; marked failed"
            );
            return Some(record(
                row,
                Disposition::Failed { counts: false },
                None,
                Some("invalid_profile".into()),
                Some(format!("outbox row {}: {e}", row.id)),
                vec![],
            ));
        }
    };
    // The last moment a request may start and still finish inside the lease.
    let deadline = claimed_at + shared.settings.lease
        - shared.settings.request_timeout.min(shared.settings.lease)
        - LEASE_SAFETY.min(shared.settings.lease / 4);
    let on_the_wire = AtomicBool::new(false);
    tokio::select! {
        biased;
        // The grace is over. A row whose request never left goes back untouched; one whose
        // request may still reach Imprint keeps its lease until it expires, so no other
        // worker can send for that customer meanwhile (G1, G2).
        _ = shared.hard_stop.cancelled() => {
            (!on_the_wire.load(Ordering::Relaxed)).then(|| release(row, vec![]))
        }
        r = send(shared, row, &request, deadline, &on_the_wire) => Some(r),
    }
}

/// Sends until an answer settles the row; 429s and an open gate wait inside the lease.
async fn send(
    shared: &Shared,
    row: &OutboxRow,
    request: &UpdateCustomerRequest,
    deadline: Instant,
    on_the_wire: &AtomicBool,
) -> Record {
    let mut attempts = Vec::new();
    loop {
        let _slot = tokio::select! {
            _ = shared.stop.cancelled() => return release(row, attempts),
            s = shared.send_slots.acquire() => s.expect("the semaphore is never closed"),
        };
        let admit = tokio::select! {
            _ = shared.stop.cancelled() => return release(row, attempts),
            a = shared.traffic.admit(deadline) => a,
        };
        let probe = admit == Admit::Probe;
        // Past the deadline the request could outlive the lease: another worker could then
        // claim the customer while this request is on the wire. Give the row back instead.
        if admit == Admit::GiveUp || Instant::now() >= deadline {
            if probe {
                shared.traffic.gate.probe_abandoned();
            }
            shared.stats.released.fetch_add(1, Ordering::Relaxed);
            return release(row, attempts);
        }
        on_the_wire.store(true, Ordering::Relaxed);
        let started_at = chrono::Utc::now();
        let t0 = Instant::now();
        let answer = shared
            .client
            .update_customer(&row.customer_id, request)
            .await;
        let duration = t0.elapsed();
        shared.traffic.report(&answer, probe);
        observe(&answer, duration);
        let n = row.attempts + 1;
        let log =
            |outcome, status: Option<u16>, code: Option<&str>, error: Option<String>| AttemptLog {
                attempt: n,
                started_at,
                duration,
                http_status: status,
                outcome,
                error_code: code.map(str::to_owned),
                error,
            };
        match answer {
            Answer::Synced { status, customer } => {
                attempts.push(log("synced", Some(status), None, None));
                shared.stats.synced.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(http_status = status, "synced");
                let sent = request.fields();
                // The names of the fields Imprint returned otherwise than sent, compared as
                // reconciliation compares them (never the values).
                let drift = crate::profile::compare::drifted_fields(&sent, &customer);
                let disposition = Disposition::Synced {
                    imprint_updated_at: customer.updated_at(),
                    statuses: customer.statuses.as_ref().map(json_text),
                    drift: (!drift.is_empty()).then(|| json_text(&drift)),
                    accepted: json_text(&sent),
                    response: Some(customer.into_stored(shared.settings.keep_sensitive)),
                };
                return record(row, disposition, Some(status), None, None, attempts);
            }
            Answer::Accepted { status, error } => {
                // Accepted, so final; what Imprint now holds is unknown, so no state is kept
                // (the previous one is stale) and the code says why.
                attempts.push(log("synced", Some(status), Some(&error.code), None));
                shared.stats.synced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(http_status = status, error_code = %error.code, "synced, but the answer could not be read");
                let disposition = Disposition::Synced {
                    imprint_updated_at: None,
                    statuses: None,
                    drift: None,
                    // Imprint took the request, even if its answer cannot be read.
                    accepted: json_text(&request.fields()),
                    response: None,
                };
                return record(
                    row,
                    disposition,
                    Some(status),
                    Some(error.code),
                    Some(error.message),
                    attempts,
                );
            }
            Answer::RateLimited { retry_after } => {
                // Not an attempt: the gate and the rate limiter now hold every sender back.
                shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    retry_after_ms = retry_after.as_millis() as u64,
                    "rate limited (429)"
                );
                attempts.push(log("rate_limited", Some(429), Some("rate_limited"), None));
                continue;
            }
            // Answers no row gets past (a rejected key; a redirect, i.e. a wrong base URL):
            // the row goes back untouched, and `run --once`, which cannot succeed so, stops.
            Answer::AuthRejected { status, error } | Answer::Redirected { status, error } => {
                let (flag, outcome) = if (300..400).contains(&status) {
                    (&shared.stats.redirected, "redirected")
                } else {
                    (&shared.stats.auth_rejected, "auth_rejected")
                };
                flag.store(true, Ordering::Relaxed);
                attempts.push(log(outcome, Some(status), Some(&error.code), None));
                if shared.mode.once {
                    shared.stop.cancel();
                }
                return release(row, attempts);
            }
            Answer::Retry { status, error } => {
                attempts.push(log(
                    "retry",
                    status,
                    Some(&error.code),
                    Some(error.message.clone()),
                ));
                let message = describe(&error);
                // No answer (a timeout, a broken connection): the request may still be
                // applied, so the customer gets a quiet period before anything newer (G2).
                let hold = status.is_none().then_some(shared.settings.request_timeout);
                if n as u32 >= shared.settings.max_attempts {
                    shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error_code = "max_attempts_exceeded", last_error_code = %error.code, attempts = n, "giving up on row");
                    return Record {
                        hold,
                        ..record(
                            row,
                            Disposition::Failed { counts: true },
                            status,
                            Some("max_attempts_exceeded".into()),
                            Some(format!(
                                "after {n} attempts, last error {}: {message}",
                                error.code
                            )),
                            attempts,
                        )
                    };
                }
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                let delay = retry::backoff(
                    n as u32,
                    shared.settings.backoff_base,
                    shared.settings.backoff_max,
                );
                tracing::debug!(error_code = %error.code, attempt = n, delay_ms = delay.as_millis() as u64, "retrying later");
                return Record {
                    hold,
                    ..record(
                        row,
                        Disposition::Retry {
                            delay,
                            counts: true,
                        },
                        status,
                        Some(error.code.clone()),
                        Some(message),
                        attempts,
                    )
                };
            }
            Answer::Failed { status, error } => {
                attempts.push(log(
                    "failed",
                    Some(status),
                    Some(&error.code),
                    Some(error.message.clone()),
                ));
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(http_status = status, error_code = %error.code, param = error.param.as_deref(), "the API refused the row; marked failed");
                let message = describe(&error);
                return record(
                    row,
                    Disposition::Failed { counts: true },
                    Some(status),
                    Some(error.code),
                    Some(message),
                    attempts,
                );
            }
        }
    }
}

/// The stored message: the blamed field first, where the API names one.
fn describe(error: &crate::imprint::error::ApiError) -> String {
    match &error.param {
        Some(p) => format!("{p}: {}", error.message),
        None => error.message.clone(),
    }
}

fn observe(answer: &Answer, duration: Duration) {
    metrics::counter!("imprint_sync_http_requests_total", "status" => class(answer)).increment(1);
    metrics::histogram!("imprint_sync_http_request_duration_seconds")
        .record(duration.as_secs_f64());
}

/// The `status` label of an answer. A body that timed out or broke after its status line is
/// a transport failure whatever the status said (a 200 cut short is no 4xx).
fn class(answer: &Answer) -> &'static str {
    match answer {
        Answer::Synced { .. } | Answer::Accepted { .. } => "2xx",
        Answer::Redirected { .. } => "3xx",
        Answer::RateLimited { .. } => "429",
        Answer::Retry { error, .. } if error.code == "timeout" => "timeout",
        Answer::Retry {
            status: Some(s), ..
        } if *s >= 500 => "5xx",
        Answer::Retry {
            status: Some(s), ..
        } if *s >= 400 => "4xx",
        Answer::Retry { .. } => "error",
        Answer::Failed { status, .. } | Answer::AuthRejected { status, .. } => {
            if *status >= 500 {
                "5xx"
            } else {
                "4xx"
            }
        }
    }
}

fn release(row: &OutboxRow, attempts: Vec<AttemptLog>) -> Record {
    record(row, Disposition::Release, None, None, None, attempts)
}

fn record(
    row: &OutboxRow,
    disposition: Disposition,
    http_status: Option<u16>,
    error_code: Option<String>,
    error: Option<String>,
    attempts: Vec<AttemptLog>,
) -> Record {
    Record {
        id: row.id,
        customer_id: row.customer_id.clone(),
        claim: row.lease_expires_at,
        hold: None,
        disposition,
        http_status,
        error_code,
        error,
        attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imprint::error::ApiError;

    /// A 200 whose body timed out or broke is counted as what it was, not as a 4xx.
    #[test]
    fn a_2xx_cut_short_is_counted_as_a_transport_failure() {
        let retry = |status, code: &str| Answer::Retry {
            status,
            error: ApiError::new(code, "x"),
        };
        let table = [
            (retry(Some(200), "timeout"), "timeout"),
            (retry(Some(200), "connection_broken"), "error"),
            (retry(Some(503), "http_503"), "5xx"),
            (retry(Some(409), "CONFLICT_ERROR"), "4xx"),
            (retry(Some(101), "http_101"), "error"),
            (retry(None, "connection_error"), "error"),
        ];
        for (answer, want) in table {
            assert_eq!(class(&answer), want, "{answer:?}");
        }
    }
}

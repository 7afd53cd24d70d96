//! One claimed row: map it, send it (through the traffic gate), and turn the answer into a
//! record for the recorder.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use super::fate::{self, Fate, Policy};
use crate::imprint::UpdateCustomerRequest;
use crate::imprint::error::{Answer, TransportKind};
use crate::imprint::model::json_text;
use crate::labels::HttpClass;
use crate::outbox::model::OutboxRow;
use crate::outbox::outcome::ErrorCode;
use crate::outbox::record::{AttemptLog, Disposition, Record};
use crate::traffic::{Admit, retry};
use crate::{profile, telemetry};

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
                // The daemon's own codes as text, the API's with `%`: the pretty log quotes
                // the one and not the other, and always has (operators grep these lines).
                error_code = ErrorCode::InvalidProfile.as_str(),
                field = e.field,
                "row cannot be mapped; marked failed"
            );
            return Some(record(
                row,
                Disposition::Failed { counts: false },
                None,
                Some(ErrorCode::InvalidProfile.to_string()),
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
        let n = row.attempts.saturating_add(1);
        // A count below zero (edited by hand) is past any limit.
        let attempt = u32::try_from(n).unwrap_or(u32::MAX);
        attempts.push(attempt_log(&answer, n, started_at, duration));
        let status = answer.status();
        let error = answer.error();
        match fate::decide(&answer, attempt, &Policy::from_settings(&shared.settings)) {
            Fate::Synced => {
                shared.stats.synced.fetch_add(1, Ordering::Relaxed);
                return synced(shared, row, request, answer, attempts);
            }
            Fate::SendAgain => {
                // Not an attempt: the gate and the rate limiter now hold every sender back.
                shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                if let Answer::RateLimited { retry_after } = answer {
                    tracing::debug!(
                        retry_after_ms = telemetry::ms(retry_after),
                        "rate limited (429)"
                    );
                }
                continue;
            }
            // Answers no row gets past (a rejected key; a redirect, i.e. a wrong base URL):
            // the row goes back untouched, and `run --once`, which cannot succeed so, stops.
            Fate::Release => {
                let flag = match answer {
                    Answer::Redirected { .. } => &shared.stats.redirected,
                    _ => &shared.stats.auth_rejected,
                };
                flag.store(true, Ordering::Relaxed);
                if shared.mode.once {
                    shared.stop.cancel();
                }
                return release(row, attempts);
            }
            Fate::Retry { up_to, hold } => {
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                let delay = retry::jitter(up_to);
                let code = error.map(|e| e.code.clone());
                tracing::debug!(
                    error_code = code.as_deref().map(tracing::field::display),
                    attempt = n,
                    delay_ms = telemetry::ms(delay),
                    "retrying later"
                );
                let disposition = Disposition::Retry {
                    delay,
                    counts: true,
                };
                let message = error.map(describe);
                return Record {
                    hold,
                    ..record(row, disposition, status, code, message, attempts)
                };
            }
            Fate::Failed { gave_up, hold } => {
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                let api_code = error.map_or("-", |e| e.code.as_str());
                let message = error.map(describe).unwrap_or_default();
                let (code, message) = if gave_up {
                    let code = ErrorCode::MaxAttemptsExceeded;
                    tracing::warn!(error_code = code.as_str(), last_error_code = %api_code, attempts = n, "giving up on row");
                    let message = format!("after {n} attempts, last error {api_code}: {message}");
                    (code.to_string(), message)
                } else {
                    let param = error.and_then(|e| e.param.as_deref());
                    tracing::warn!(
                        http_status = status,
                        error_code = %api_code,
                        param,
                        "the API refused the row; marked failed"
                    );
                    (api_code.to_owned(), message)
                };
                let disposition = Disposition::Failed { counts: true };
                return Record {
                    hold,
                    ..record(
                        row,
                        disposition,
                        status,
                        Some(code),
                        Some(message),
                        attempts,
                    )
                };
            }
        }
    }
}

/// The record of a row Imprint took, with Imprint's view of the customer where its answer
/// could be read.
fn synced(
    shared: &Shared,
    row: &OutboxRow,
    request: &UpdateCustomerRequest,
    answer: Answer,
    attempts: Vec<AttemptLog>,
) -> Record {
    let status = answer.status();
    if let Answer::Synced { status, customer } = answer {
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
            response: Some(crate::profile::compare::stored_response(
                &sent,
                customer,
                shared.settings.keep_sensitive,
            )),
        };
        return record(row, disposition, Some(status), None, None, attempts);
    }
    // Accepted, so final; what Imprint now holds is unknown, so no state is kept (the
    // previous one is stale) and the code says why.
    let error = answer.error();
    let code = error.map(|e| e.code.clone());
    tracing::warn!(
        http_status = status,
        error_code = code.as_deref().map(tracing::field::display),
        "synced, but the answer could not be read"
    );
    let disposition = Disposition::Synced {
        imprint_updated_at: None,
        statuses: None,
        drift: None,
        // Imprint took the request, even if its answer cannot be read.
        accepted: json_text(&request.fields()),
        response: None,
    };
    let message = error.map(|e| e.message.clone());
    record(row, disposition, status, code, message, attempts)
}

/// The attempt as `sync_attempts` keeps it: the code of the answer, and the message of a
/// retryable or final failure.
fn attempt_log(
    answer: &Answer,
    attempt: i32,
    started_at: chrono::DateTime<chrono::Utc>,
    duration: Duration,
) -> AttemptLog {
    let (code, message) = match answer {
        Answer::Synced { .. } => (None, None),
        Answer::RateLimited { .. } => (Some(ErrorCode::RateLimited.to_string()), None),
        Answer::Accepted { error, .. }
        | Answer::AuthRejected { error, .. }
        | Answer::Redirected { error, .. } => (Some(error.code.clone()), None),
        Answer::Retry { error, .. } | Answer::Failed { error, .. } => {
            (Some(error.code.clone()), Some(error.message.clone()))
        }
    };
    AttemptLog {
        attempt,
        started_at,
        duration,
        http_status: answer.status(),
        outcome: fate::logged_as(answer),
        error_code: code,
        error: message,
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
    class(answer).count(1);
    metrics::histogram!("imprint_sync_http_request_duration_seconds")
        .record(duration.as_secs_f64());
}

/// The `status` label of an answer. A body that timed out or broke after its status line is
/// a transport failure whatever the status said (a 200 cut short is no 4xx).
fn class(answer: &Answer) -> HttpClass {
    match answer {
        Answer::Synced { .. } | Answer::Accepted { .. } => HttpClass::Success,
        Answer::Redirected { .. } => HttpClass::Redirect,
        Answer::RateLimited { .. } => HttpClass::RateLimited,
        Answer::Retry { error, .. } if error.code == TransportKind::Timeout.code() => {
            HttpClass::Timeout
        }
        Answer::Retry {
            status: Some(s), ..
        } if *s >= 500 => HttpClass::ServerError,
        Answer::Retry {
            status: Some(s), ..
        } if *s >= 400 => HttpClass::ClientError,
        Answer::Retry { .. } => HttpClass::Error,
        Answer::Failed { status, .. } | Answer::AuthRejected { status, .. } => {
            if *status >= 500 {
                HttpClass::ServerError
            } else {
                HttpClass::ClientError
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
            assert_eq!(class(&answer).as_str(), want, "{answer:?}");
        }
    }
}

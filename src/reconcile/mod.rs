//! Reconciliation: reads Imprint's copy of customers (`GET /v2/customers/{id}`) and compares
//! it with the newest profile Imprint accepted from the partner (`customer_sync_state.accepted`).
//! Each customer ends `in_step`, `drifted` (field names, never values), `missing` (404) or
//! `error` (the read failed after retries; not drift). `--repair` enqueues an outbox row with
//! the accepted profile, so the engine resends it with all its guarantees.
//!
//! Reads go through the process's traffic gate (shared rate, 429 pause, circuit, auth pause)
//! and, before it, through a bucket of their own holding them to `reconcile.max_share` of the
//! rate, so a sweep never starves the sync of changes. Used by `imprint-sync reconcile` (one
//! pass, [`command`]) and by the continuous sweep inside `run` ([`sweep`]).

pub mod command;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::imprint::Client;
use crate::imprint::error::Answer;
use crate::imprint::model::{Customer, json_text};
use crate::outbox::reconcile::{Finding, ReconcileStore, Target};
use crate::profile::compare;
use crate::traffic::{AdaptiveRate, Admit, Traffic};

/// Reads of one customer before it counts as `error` (429s do not count).
const READ_ATTEMPTS: u32 = 3;
/// Checks in flight at once (the share of the rate is the real limit; this bounds memory).
const CHECKS_IN_FLIGHT: usize = 16;
/// How long a read waits at a shut gate before it looks again (it waits on regardless).
const GATE_PATIENCE: Duration = Duration::from_secs(600);

/// The result labels of `imprint_sync_reconcile_checked_total`.
pub const RESULTS: [&str; 4] = ["in_step", "drifted", "missing", "error"];

/// What the check of one customer came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InStep,
    Drifted {
        fields: Vec<&'static str>,
        /// The outbox id of the repair row, when one was enqueued.
        repair: Option<i64>,
    },
    Missing,
    /// The read (or the write of the finding) failed; the code says why. Not drift.
    Error(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::InStep => "in_step",
            Outcome::Drifted { .. } => "drifted",
            Outcome::Missing => "missing",
            Outcome::Error(_) => "error",
        }
    }
}

/// A check that ended without an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The key was rejected (401/403), or the API answered with a redirect (3xx).
    AuthRejected,
    /// Stopped (shutdown, or another check met a rejected key).
    Stopped,
}

/// One read, classified for reconciliation.
enum Read {
    Found(Box<Customer>),
    Missing,
    Failed(String),
    Interrupted(Interrupted),
}

/// Reads customers at Imprint within reconciliation's share of the rate.
pub struct Reader {
    client: Client,
    traffic: Arc<Traffic>,
    /// Reconciliation's own bucket: `max_share` of the rate (of this replica's share).
    share: AdaptiveRate,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl Reader {
    pub fn new(settings: &Settings, client: Client, traffic: Arc<Traffic>) -> Self {
        let share = settings.reconcile.max_share;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "between 1 and `rate_limit.burst` (a share is at most 1)"
        )]
        let burst = (f64::from(settings.rate_limit.burst) * share)
            .ceil()
            .max(1.0) as u32;
        Self {
            client,
            traffic,
            share: AdaptiveRate::new(settings.rate_limit.requests_per_second * share, burst),
            backoff_base: Duration::from_millis(settings.sync.backoff_base_ms),
            backoff_max: Duration::from_millis(settings.sync.backoff_max_ms),
        }
    }

    /// Live replicas changed: the share follows this replica's part of the rate.
    pub fn set_replicas(&self, replicas: u32) {
        self.share.set_replicas(replicas);
    }

    /// Reads per second this replica's reconciliation may make now.
    pub fn rate(&self) -> f64 {
        self.share.effective()
    }

    /// How long the traffic gate still holds every request back (429, open circuit, rejected
    /// key); zero when the next request may go as its probe.
    pub fn paused_for(&self) -> Option<Duration> {
        self.traffic.paused_for()
    }

    async fn read(&self, customer_id: &str, stop: &CancellationToken) -> Read {
        let stopped = Read::Interrupted(Interrupted::Stopped);
        let mut failures = 0;
        loop {
            let patience = Instant::now() + GATE_PATIENCE;
            let ready = tokio::select! {
                _ = stop.cancelled() => return stopped,
                ready = self.share.until_ready(patience) => ready,
            };
            if !ready {
                continue;
            }
            let admit = tokio::select! {
                _ = stop.cancelled() => return stopped,
                a = self.traffic.admit(patience) => a,
            };
            if admit == Admit::GiveUp {
                continue;
            }
            let answer = self.client.get_customer(customer_id).await;
            self.traffic.report(&answer, admit == Admit::Probe);
            match answer {
                Answer::Synced { customer, .. } => return Read::Found(customer),
                // Not an attempt: the gate and the bucket now hold every sender back.
                Answer::RateLimited { .. } => {}
                Answer::Failed { status: 404, .. } => return Read::Missing,
                // A 2xx without a readable customer object: nothing to compare with.
                Answer::Failed { error, .. } | Answer::Accepted { error, .. } => {
                    return Read::Failed(error.code);
                }
                // Every read would meet the same answer: stop, as the sync pauses.
                Answer::AuthRejected { .. } | Answer::Redirected { .. } => {
                    return Read::Interrupted(Interrupted::AuthRejected);
                }
                Answer::Retry { error, .. } => {
                    failures += 1;
                    if failures >= READ_ATTEMPTS {
                        return Read::Failed(error.code);
                    }
                    let delay = crate::traffic::retry::backoff(
                        failures,
                        self.backoff_base,
                        self.backoff_max,
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return stopped,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Checks customers: reads, compares, writes the finding, and repairs when asked.
pub struct Reconciler {
    pub reader: Reader,
    pub store: ReconcileStore,
    pub repair: bool,
}

/// A customer and what its check came to.
pub type Checked = (Target, Result<Outcome, Interrupted>);

impl Reconciler {
    /// Checks one customer. A customer synced while it was read is read again once (the
    /// comparison would be against an older profile); a second time, the check is an error.
    pub async fn check(&self, mut target: Target, stop: &CancellationToken) -> Checked {
        for round in 0..2 {
            let (finding_of, statuses) = match self.reader.read(&target.customer_id, stop).await {
                Read::Found(customer) => {
                    let empty = Map::new();
                    let accepted = target
                        .accepted
                        .as_ref()
                        .and_then(Value::as_object)
                        .unwrap_or(&empty);
                    let fields = compare::drifted_fields(accepted, &customer);
                    (Some(fields), customer.statuses.as_ref().map(json_text))
                }
                Read::Missing => (None, None),
                Read::Failed(code) => {
                    if let Err(e) = self.store.checked(&target.customer_id).await {
                        tracing::warn!(customer_id = %target.customer_id, error = %db_error(&e), "could not note the check");
                    }
                    return self.done(target, Outcome::Error(code));
                }
                Read::Interrupted(why) => return (target, Err(why)),
            };
            let finding = match &finding_of {
                Some(f) if f.is_empty() => Finding::InStep,
                Some(f) => Finding::Drifted(f),
                None => Finding::Missing,
            };
            let outcome = |repair| match &finding_of {
                Some(f) if f.is_empty() => Outcome::InStep,
                Some(f) => Outcome::Drifted {
                    fields: f.clone(),
                    repair,
                },
                None => Outcome::Missing,
            };
            if target.last_synced_outbox_id.is_none() {
                // Named on the command line but never synced: nothing to write, no profile to
                // repair with.
                return self.done(target, outcome(None));
            }
            match self
                .store
                .write(&target, &finding, statuses.as_deref())
                .await
            {
                Ok(true) => {
                    let repair = match finding {
                        Finding::Drifted(_) if self.repair => self.enqueue_repair(&target).await,
                        _ => None,
                    };
                    return self.done(target, outcome(repair));
                }
                Ok(false) if round == 0 => {
                    match self
                        .store
                        .named(std::slice::from_ref(&target.customer_id), None)
                        .await
                    {
                        Ok(mut again) if !again.is_empty() => target = again.remove(0),
                        Ok(_) => return self.done(target, Outcome::Error("gone".into())),
                        Err(e) => return self.database_error(target, &e),
                    }
                }
                Ok(false) => {
                    return self.done(target, Outcome::Error("changed_while_checking".into()));
                }
                Err(e) => return self.database_error(target, &e),
            }
        }
        unreachable!("the second round always returns")
    }

    async fn enqueue_repair(&self, target: &Target) -> Option<i64> {
        match self.store.repair(target).await {
            Ok(Some(id)) => {
                metrics::counter!("imprint_sync_reconcile_repaired_total").increment(1);
                tracing::info!(customer_id = %target.customer_id, outbox_id = id, "repair enqueued");
                Some(id)
            }
            Ok(None) => {
                tracing::info!(customer_id = %target.customer_id, "not repaired: a newer change of the customer is pending, in flight or failed, or it was synced meanwhile");
                None
            }
            Err(e) => {
                tracing::warn!(customer_id = %target.customer_id, error = %db_error(&e), "could not enqueue the repair");
                None
            }
        }
    }

    fn database_error(&self, target: Target, e: &sqlx::Error) -> Checked {
        tracing::warn!(customer_id = %target.customer_id, error = %db_error(e), "could not write what the check found");
        self.done(target, Outcome::Error("database_error".into()))
    }

    fn done(&self, target: Target, outcome: Outcome) -> Checked {
        metrics::counter!("imprint_sync_reconcile_checked_total", "result" => outcome.label())
            .increment(1);
        match &outcome {
            Outcome::Drifted { fields, .. } => {
                tracing::info!(customer_id = %target.customer_id, fields = fields.join(","), "drift found")
            }
            Outcome::Missing => {
                tracing::info!(customer_id = %target.customer_id, "customer missing at Imprint (404)")
            }
            Outcome::Error(code) => {
                tracing::warn!(customer_id = %target.customer_id, error_code = %code, "could not check the customer")
            }
            Outcome::InStep => {
                tracing::debug!(customer_id = %target.customer_id, "in step")
            }
        }
        (target, Ok(outcome))
    }

    /// Checks a batch, a few at a time. A rejected key stops the batch (`stop` is cancelled);
    /// customers taken but not checked are given back, keeping their place in the walk.
    pub async fn check_all(
        self: &Arc<Self>,
        targets: Vec<Target>,
        stop: &CancellationToken,
    ) -> Vec<Checked> {
        let mut queue = targets.into_iter();
        let mut running = JoinSet::new();
        let mut done = Vec::new();
        loop {
            while running.len() < CHECKS_IN_FLIGHT {
                let Some(target) = queue.next() else { break };
                let (me, stop) = (self.clone(), stop.clone());
                running.spawn(async move { me.check(target, &stop).await });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            match joined {
                Ok(checked) => {
                    if checked.1 == Err(Interrupted::AuthRejected) {
                        stop.cancel();
                    }
                    done.push(checked);
                }
                Err(e) => tracing::error!(error = %e, "a check panicked"),
            }
        }
        let untouched: Vec<&Target> = done
            .iter()
            .filter(|(t, r)| r.is_err() && t.last_synced_outbox_id.is_some())
            .map(|(t, _)| t)
            .collect();
        if !untouched.is_empty()
            && let Err(e) = self.store.give_back(&untouched).await
        {
            tracing::debug!(error = %e, "could not give back customers not checked; they wait for the next pass");
        }
        done
    }
}

/// A database error fit for a log line: a refusal by its SQLSTATE only, since PostgreSQL's
/// message may quote the value it refused (personal data); an outage by its message.
fn db_error(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => format!(
            "the database refused it (SQLSTATE {})",
            d.code().unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// Makes the reconciliation counters appear from the first scrape (each label at 0).
pub fn register_metrics() {
    metrics::describe_counter!(
        "imprint_sync_reconcile_checked_total",
        "Customers checked against Imprint's copy, by result (in_step, drifted, missing, error)."
    );
    metrics::describe_counter!(
        "imprint_sync_reconcile_repaired_total",
        "Repair rows enqueued for drifted customers."
    );
    for result in RESULTS {
        metrics::counter!("imprint_sync_reconcile_checked_total", "result" => result).increment(0);
    }
    metrics::counter!("imprint_sync_reconcile_repaired_total").increment(0);
}

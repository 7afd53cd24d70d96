//! `imprint-sync reconcile`: one pass over the customers, a summary table or `--json`, and exit
//! codes like `diff`: 0 nothing drifted or missing, 1 drift or missing found, 2 the key was
//! rejected, 64 bad configuration or arguments.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Checked, Interrupted, Outcome, Reader, Reconciler};
use crate::cli::ReconcileArgs;
use crate::config::Settings;
use crate::exit;
use crate::outbox::reconcile::{Counts, ReconcileStatus, ReconcileStore, Window};
use crate::outbox::store::Store;
use crate::signals;
use crate::traffic::Traffic;
use crate::{db, profile};

/// Customers taken per round of a pass.
const CHUNK: u64 = 500;

/// What a pass found: the counts, and the customers that are not in step.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub counts: Counts,
    pub customers: Vec<CustomerLine>,
    #[serde(skip)]
    pub auth_rejected: bool,
}

/// One customer that is not in step. Field names and error codes only, never values.
#[derive(Debug, Serialize)]
pub struct CustomerLine {
    pub customer_id: String,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    fn add(&mut self, checked: Vec<Checked>) {
        for (target, result) in checked {
            let outcome = match result {
                Ok(o) => o,
                Err(Interrupted::AuthRejected) => {
                    self.auth_rejected = true;
                    continue;
                }
                Err(Interrupted::Stopped) => continue,
            };
            let c = &mut self.counts;
            c.checked += 1;
            let mut line = CustomerLine {
                customer_id: target.customer_id,
                result: outcome.label(),
                fields: None,
                repaired: None,
                error: None,
            };
            match outcome {
                Outcome::InStep => {
                    c.in_step += 1;
                    continue;
                }
                Outcome::Drifted { fields, repair } => {
                    c.drifted += 1;
                    c.repaired += i64::from(repair.is_some());
                    line.fields = Some(fields);
                    line.repaired = Some(repair.is_some());
                }
                Outcome::Missing => c.missing += 1,
                Outcome::Error(code) => {
                    c.errors += 1;
                    line.error = Some(code);
                }
            }
            self.customers.push(line);
        }
    }

    /// The exit code, like `diff`.
    pub fn exit_code(&self) -> u8 {
        if self.auth_rejected {
            exit::AUTH_OR_UNAVAILABLE
        } else if self.counts.drifted + self.counts.missing > 0 {
            exit::ROWS_FAILED
        } else {
            exit::OK
        }
    }

    /// The plain form: the counts, then one line per customer not in step.
    pub fn table(&self) -> String {
        let c = &self.counts;
        let mut out = String::new();
        for (k, v) in [
            ("checked", c.checked),
            ("in step", c.in_step),
            ("drifted", c.drifted),
            ("missing", c.missing),
            ("errors", c.errors),
            ("repaired", c.repaired),
        ] {
            out.push_str(&format!("{k:<10} {v}\n"));
        }
        if !self.customers.is_empty() {
            out.push_str(&format!(
                "\n{:<40} {:<8} {:<9} fields / error\n",
                "customer_id", "result", "repaired"
            ));
            for l in &self.customers {
                let detail = match (&l.fields, &l.error) {
                    (Some(f), _) => f.join(", "),
                    (_, Some(e)) => e.clone(),
                    _ => String::new(),
                };
                let repaired = l.repaired.map_or("-", |r| if r { "yes" } else { "no" });
                out.push_str(&format!(
                    "{:<40} {:<8} {:<9} {detail}\n",
                    l.customer_id, l.result, repaired
                ));
            }
        }
        out
    }
}

/// Runs `imprint-sync reconcile`; returns the exit code.
pub async fn reconcile(settings: Settings, args: ReconcileArgs) -> anyhow::Result<u8> {
    for id in &args.customer {
        if let Err(e) = profile::check_customer_id(id) {
            eprintln!("imprint-sync: --customer: {}", e.reason);
            return Ok(exit::CONFIG);
        }
    }
    let since = args.since;
    let pool = db::pool(&settings.database)?;
    db::check_migrated(&pool).await?;
    let traffic = settings.traffic();
    let reconciler = Arc::new(Reconciler {
        reader: Reader::new(&settings, settings.client()?, traffic.clone()),
        store: ReconcileStore::new(pool.clone()),
        repair: args.repair,
    });
    let stop = CancellationToken::new();
    signals::on_signals(stop.clone());
    // The reads spend the deployment's rate: while the pass runs it counts as a replica, so
    // the running daemons give it its part instead of the API seeing more than the limit.
    let replica = Store::new(pool, format!("reconcile-{}", crate::engine::worker_id()));
    let done = CancellationToken::new();
    let beat = tokio::spawn(heartbeat(
        replica.clone(),
        traffic,
        reconciler.clone(),
        done.clone(),
    ));
    let result = pass(&reconciler, &args, since, &stop).await;
    done.cancel();
    let _ = beat.await;
    if let Err(e) = replica.leave().await {
        tracing::debug!(error = %e, "could not leave the live replicas");
    }
    let (started, report) = result?;
    if let Err(e) = reconciler
        .store
        .record_run(started, args.repair, &report.counts)
        .await
    {
        tracing::warn!(error = %e, "could not keep the summary of this pass for status");
    }
    let c = &report.counts;
    tracing::info!(
        checked = c.checked,
        in_step = c.in_step,
        drifted = c.drifted,
        missing = c.missing,
        errors = c.errors,
        repaired = c.repaired,
        "reconcile pass done"
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.auth_rejected {
        eprintln!(
            "imprint-sync: the API key was rejected (401/403; check api.key) or the API answered with a redirect (3xx; check api.base_url); the customers not checked were left as they were"
        );
    }
    Ok(report.exit_code())
}

/// One pass: the named customers, or every customer (least recently checked first) once.
async fn pass(
    reconciler: &Arc<Reconciler>,
    args: &ReconcileArgs,
    since: Option<Duration>,
    stop: &CancellationToken,
) -> anyhow::Result<(chrono::DateTime<chrono::Utc>, Report)> {
    let store = &reconciler.store;
    let started = store.now().await.context("reading the database clock")?;
    let mut report = Report::default();
    let limit = args.limit.unwrap_or(u64::MAX);
    if !args.customer.is_empty() {
        let mut targets = store
            .named(&args.customer, since)
            .await
            .context("reading the named customers")?;
        targets.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        report.add(reconciler.check_all(targets, stop).await);
        return Ok((started, report));
    }
    let window = Window {
        not_checked_since: Some(started),
        synced_within: since,
    };
    let mut left = limit;
    let mut seen = HashSet::new();
    while left > 0 && !stop.is_cancelled() {
        let n = left.min(CHUNK) as u32;
        let targets = store
            .take(n, window)
            .await
            .context("taking the next customers to check")?;
        // Each customer once per pass, whatever the clock does.
        let targets: Vec<_> = targets
            .into_iter()
            .filter(|t| seen.insert(t.customer_id.clone()))
            .collect();
        if targets.is_empty() {
            break;
        }
        left = left.saturating_sub(targets.len() as u64);
        report.add(reconciler.check_all(targets, stop).await);
        if report.auth_rejected {
            break;
        }
    }
    Ok((started, report))
}

/// Keeps this pass among the live replicas while it runs.
async fn heartbeat(
    replica: Store,
    traffic: Arc<Traffic>,
    reconciler: Arc<Reconciler>,
    done: CancellationToken,
) {
    let host = crate::engine::hostname();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut announced = false;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = every.tick() => {}
        }
        match replica.heartbeat(&host).await {
            Ok(live) => {
                traffic.rate.set_replicas(live);
                reconciler.reader.set_replicas(live);
                if !announced {
                    announced = replica.announce().await.is_ok();
                }
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

/// The reconciliation lines of the `status` table.
pub fn status_lines(r: &ReconcileStatus) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
    match &r.last_pass {
        Some(p) => line(
            "reconcile last pass",
            format!(
                "{} ({} checked, {} drifted, {} missing, {} errors, {} repaired)",
                p.finished_at.to_rfc3339(),
                p.counts.checked,
                p.counts.drifted,
                p.counts.missing,
                p.counts.errors,
                p.counts.repaired
            ),
        ),
        None => line("reconcile last pass", "-".to_owned()),
    }
    line(
        "reconcile last check",
        r.last_checked_at.map_or("-".to_owned(), |t| t.to_rfc3339()),
    );
    line(
        &format!("verified in last {} h", r.period_hours),
        r.verified_in_period.to_string(),
    );
    line("drifted now", r.drifted_now.to_string());
    line("missing now", r.missing_now.to_string());
    out
}

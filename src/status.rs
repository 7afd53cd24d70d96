//! `imprint-sync status [--json]`: what the outbox looks like now.

use anyhow::Context;

use crate::config::Settings;
use crate::db;
use crate::outbox::reconcile::ReconcileStore;
use crate::outbox::store::{StatusReport, Store};

/// Prints the status, as a table or one JSON object.
pub async fn status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let mut report = Store::new(pool.clone(), "status").status().await.context(
        "reading the outbox status (is the schema migrated? run `imprint-sync migrate`)",
    )?;
    let period = settings.reconcile.period();
    if period != crate::outbox::reconcile::DEFAULT_PERIOD {
        report.reconcile = ReconcileStore::new(pool)
            .status(period)
            .await
            .context("reading the reconciliation status")?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The plain form: a small aligned table.
pub fn table(r: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
    for (state, n) in &r.counts {
        line(state, n.to_string());
    }
    line(
        "oldest pending age",
        r.oldest_pending_age_seconds
            .map_or("-".to_owned(), |s| format!("{s:.1} s")),
    );
    line(
        "last synced at",
        r.last_synced_at.map_or("-".to_owned(), |t| t.to_rfc3339()),
    );
    line("live replicas", r.replicas.len().to_string());
    for rep in &r.replicas {
        line(
            "  replica",
            format!(
                "{} (v{}, since {})",
                rep.worker_id,
                rep.version,
                rep.started_at.to_rfc3339()
            ),
        );
    }
    if r.failed_by_error_code.is_empty() {
        line("failed by error code", "-".to_owned());
    } else {
        line("failed by error code", String::new());
        for (code, n) in &r.failed_by_error_code {
            line(&format!("  {code}"), n.to_string());
        }
    }
    out.push_str(&crate::reconcile::command::status_lines(&r.reconcile));
    out
}

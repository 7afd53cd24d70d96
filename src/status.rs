//! `imprint-sync status [--json | --check ... | --watch [SECONDS]]`: what the outbox looks
//! like now, for people, scripts and probes.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use crate::cli::StatusArgs;
use crate::config::Settings;
use crate::db;
use crate::exit;
use crate::outbox::reconcile::ReconcileStore;
use crate::outbox::report::StatusReport;
use crate::outbox::store::Store;

/// Runs `status` with its flags; returns the exit code (`--check`: 1 on a breach).
pub async fn status(settings: &Settings, args: &StatusArgs) -> anyhow::Result<u8> {
    let pool = db::connect_now(&settings.database).await?;
    if let Some(every) = args.watch {
        return watch(&pool, Duration::from_secs(every.max(1)), settings).await;
    }
    let report = read(&pool, settings).await?;
    if args.check {
        let breaches = breaches(&report, args);
        for b in &breaches {
            println!("BREACH {b}");
        }
        if breaches.is_empty() {
            println!("OK every threshold holds");
            return Ok(exit::OK);
        }
        return Ok(exit::ROWS_FAILED);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(exit::OK)
}

async fn read(pool: &PgPool, settings: &Settings) -> anyhow::Result<StatusReport> {
    let mut report = Store::new(pool.clone(), "status").status().await.context(
        "reading the outbox status (is the schema migrated? run `imprint-sync migrate`)",
    )?;
    let period = settings.reconcile.period();
    if period != crate::outbox::reconcile::DEFAULT_PERIOD {
        report.reconcile = ReconcileStore::new(pool.clone())
            .status(period)
            .await
            .context("reading the reconciliation status")?;
    }
    Ok(report)
}

/// Redraws the table until Ctrl-C (SIGTERM ends the process as usual).
async fn watch(pool: &PgPool, every: Duration, settings: &Settings) -> anyhow::Result<u8> {
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let report = read(pool, settings).await?;
        // Clear the screen and home the cursor: a redraw, not a scroll.
        print!(
            "\x1b[2J\x1b[H{}\n(every {} s; Ctrl-C to stop) {}\n",
            table(&report),
            every.as_secs(),
            chrono::Utc::now().format("%H:%M:%S")
        );
        tokio::select! {
            _ = &mut interrupted => return Ok(exit::OK),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Each threshold given on the command line that the report breaks, named.
pub fn breaches(r: &StatusReport, args: &StatusArgs) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(max) = args.max_oldest_pending {
        let age = r.oldest_pending_age_seconds.unwrap_or(0.0);
        if age > max {
            out.push(format!(
                "oldest pending row is {age:.1} s old (--max-oldest-pending {max})"
            ));
        }
    }
    if let Some(max) = args.max_failed {
        let failed = r.counts.get("failed").copied().unwrap_or(0);
        if failed > max {
            out.push(format!("{failed} failed rows (--max-failed {max})"));
        }
    }
    if let Some(min) = args.min_replicas {
        let live = r.replicas.len();
        if live < min {
            out.push(format!("{live} live replicas (--min-replicas {min})"));
        }
    }
    out
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

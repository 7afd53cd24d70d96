//! `imprint-sync failed` and `imprint-sync history`: what an on-call engineer reads before
//! replaying. Tables for people, `--json` for scripts; ids, codes and times only.

use anyhow::Context;

use crate::cli::FailedArgs;
use crate::config::Settings;
use crate::db;
use crate::outbox::dead_letters::{self, DeadLetter, DeadLetters};
use crate::outbox::history::{self, History};

/// What a command reading the outbox adds to a query error: the schema may be missing.
const SCHEMA_HINT: &str = "is the schema migrated? run `imprint-sync migrate`";

/// Prints the failed rows matching the filters.
pub async fn failed(settings: &Settings, args: &FailedArgs) -> anyhow::Result<()> {
    let pool = db::connect_now(&settings.database).await?;
    let found = dead_letters::list(&pool, &args.filter.binds(&[]), args.limit)
        .await
        .with_context(|| format!("reading the failed rows ({SCHEMA_HINT})"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!("{}", failed_table(&found));
    }
    Ok(())
}

/// Dead letters as an aligned table, with a line saying how many were left out.
pub fn failed_table(d: &DeadLetters) -> String {
    let mut out = dead_letter_table(&d.rows);
    let shown = i64::try_from(d.rows.len()).unwrap_or(i64::MAX);
    let rows = if d.total == 1 { "row" } else { "rows" };
    out.push_str(&if shown < d.total {
        format!("{shown} of {} failed {rows} shown (--limit)\n", d.total)
    } else {
        format!("{} failed {rows}\n", d.total)
    });
    out
}

/// The rows of a dead-letter table (shared by `failed` and `run --replay-failed --dry-run`).
pub fn dead_letter_table(rows: &[DeadLetter]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.customer_id.clone(),
                r.error_code.clone(),
                r.last_http_status.map_or("-".into(), |s| s.to_string()),
                r.attempts.to_string(),
                r.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                one_line(r.last_error.as_deref().unwrap_or("-")),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CUSTOMER",
            "CODE",
            "HTTP",
            "ATTEMPTS",
            "FAILED AT",
            "MESSAGE",
        ],
        &cells,
    )
}

/// Prints one customer's history.
pub async fn history(
    settings: &Settings,
    customer_id: &str,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let pool = db::connect_now(&settings.database).await?;
    let h = history::load(&pool, customer_id, limit)
        .await
        .with_context(|| format!("reading customer {customer_id}'s history ({SCHEMA_HINT})"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&h)?);
    } else {
        print!("{}", history_text(&h));
    }
    Ok(())
}

/// The plain form of a history: the sync state, then two tables.
pub fn history_text(h: &History) -> String {
    let time = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let opt_time = |t: &Option<chrono::DateTime<chrono::Utc>>| t.as_ref().map_or("-".into(), time);
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut out = format!("customer {}\n\nsync state\n", h.customer_id);
    match &h.sync_state {
        None => out.push_str("  - (never synced)\n"),
        Some(s) => {
            let json =
                |v: &Option<serde_json::Value>| v.as_ref().map_or("-".into(), |v| v.to_string());
            for (k, v) in [
                ("last synced row", s.last_synced_outbox_id.to_string()),
                ("last synced at", time(&s.last_synced_at)),
                ("imprint updated at", opt_time(&s.imprint_updated_at)),
                ("statuses", json(&s.statuses)),
                ("drift", json(&s.drift)),
            ] {
                out.push_str(&format!("  {k:<20} {v}\n"));
            }
        }
    }
    let rows: Vec<Vec<String>> = h
        .rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.status.clone(),
                time(&r.enqueued_at),
                opt_time(&r.synced_at),
                r.attempts.to_string(),
                opt(r.error_code.clone()),
                opt(r.superseded_by.map(|i| i.to_string())),
            ]
        })
        .collect();
    let shown = if h.rows_total > i64::try_from(h.rows.len()).unwrap_or(i64::MAX) {
        format!(
            "the newest {} of {}; --limit shows more",
            h.rows.len(),
            h.rows_total
        )
    } else {
        h.rows.len().to_string()
    };
    out.push_str(&format!("\noutbox rows ({shown})\n"));
    out.push_str(&table(
        &[
            "ID",
            "STATUS",
            "ENQUEUED",
            "SYNCED",
            "ATTEMPTS",
            "CODE",
            "SUPERSEDED BY",
        ],
        &rows,
    ));
    let attempts: Vec<Vec<String>> = h
        .attempts
        .iter()
        .map(|a| {
            vec![
                a.outbox_id.to_string(),
                a.attempt.to_string(),
                time(&a.started_at),
                format!("{} ms", a.duration_ms),
                opt(a.http_status.map(|s| s.to_string())),
                a.outcome.clone(),
                opt(a.error_code.clone()),
            ]
        })
        .collect();
    out.push_str(&format!("\nattempts ({})\n", h.attempts.len()));
    out.push_str(&table(
        &[
            "ROW", "ATTEMPT", "STARTED", "DURATION", "HTTP", "OUTCOME", "CODE",
        ],
        &attempts,
    ));
    out
}

/// Left-aligned columns two spaces apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Messages are one line in a table (an API message may hold newlines).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

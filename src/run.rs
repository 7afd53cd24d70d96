//! `imprint-sync run`: the daemon, and its `--once`, `--replay-failed` and `--dry-run` modes.

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::config::Settings;
use crate::engine::backoff::Backoff;
use crate::engine::{Engine, EngineSettings, Health, RunMode, Summary};
use crate::exit;
use crate::outbox::dead_letters::Binds;
use crate::outbox::outcome::ErrorCode;
use crate::outbox::store::Store;
use crate::signals;
use crate::{db, profile};

/// Runs the daemon with the given flags; returns the exit code.
pub async fn run(settings: Settings, args: RunArgs) -> anyhow::Result<u8> {
    let pool = db::pool(&settings.database)?;
    let shutdown = CancellationToken::new();
    signals::on_signals(shutdown.clone());
    if !wait_for_schema(&pool, &shutdown).await? {
        return Ok(if args.once { exit::TEMPFAIL } else { exit::OK });
    }
    let worker_id = crate::engine::worker_id();
    let store = Store::new(pool.clone(), worker_id.clone());
    let replay = args.filter.binds(&args.ids);
    if args.dry_run && args.replay_failed {
        return replay_dry_run(&store, &replay).await;
    }
    if args.dry_run {
        return dry_run(&store, settings.sync.batch_size.max(1_000)).await;
    }
    if args.replay_failed {
        let r = store
            .replay_failed(&replay)
            .await
            .context("replaying failed rows")?;
        println!(
            "replay: {} failed rows back to pending (each customer's rows are merged per column)",
            r.replayed
        );
        tracing::info!(
            replayed = r.replayed,
            filtered = !args.filter.is_empty() || !args.ids.is_empty(),
            "replayed failed rows"
        );
    }
    let client = settings.client()?;
    let traffic = settings.traffic();
    let engine = Engine::with_mode(
        pool.clone(),
        client.clone(),
        traffic.clone(),
        EngineSettings::from_settings(&settings),
        worker_id.clone(),
        RunMode { once: args.once },
    );
    let sweep = if args.once {
        None
    } else {
        crate::reconcile::sweep::spawn(
            &settings,
            pool,
            client,
            traffic.clone(),
            engine.health(),
            shutdown.clone(),
        )
    };
    let (_, admin) = crate::admin::spawn(
        &settings,
        engine.store().clone(),
        engine.health(),
        traffic,
        shutdown.clone(),
    )
    .await?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(worker_id = %worker_id, once = args.once, "imprint-sync running");
    let summary = engine.run(shutdown.clone()).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    if let Some(sweep) = sweep {
        let _ = sweep.await;
    }
    let _ = admin.await;
    report(&summary, args.once);
    Ok(exit_code(&summary, args.once))
}

/// The exit code of a run: in `--once`, 2 when the key was rejected or the API redirected,
/// 75 when stopped (SIGTERM) before the outbox was drained, 1 when a row failed; else 0.
pub fn exit_code(summary: &Summary, once: bool) -> u8 {
    if !once {
        exit::OK
    } else if summary.auth_rejected || summary.redirected {
        exit::AUTH_OR_UNAVAILABLE
    } else if !summary.drained {
        // A Job stopped half-way must not look complete.
        exit::TEMPFAIL
    } else if summary.failed > 0 {
        exit::ROWS_FAILED
    } else {
        exit::OK
    }
}

fn report(s: &Summary, once: bool) {
    tracing::info!(
        synced = s.synced,
        failed = s.failed,
        superseded = s.superseded,
        retried = s.retried,
        rate_limited = s.rate_limited,
        "stopped"
    );
    if once {
        let why = if s.auth_rejected {
            "; the API key was rejected (401/403): check api.key — rows were left as they were"
        } else if s.redirected {
            "; the API answered with a redirect (3xx): check api.base_url — rows were left as they were"
        } else if !s.drained {
            "; stopped before the outbox was drained"
        } else {
            ""
        };
        println!(
            "synced {}, failed {}, superseded {}, retried {}, rate limited {}{why}",
            s.synced, s.failed, s.superseded, s.retried, s.rate_limited,
        );
    }
}

/// Waits for the database and the migrated schema; false when stopped while waiting.
async fn wait_for_schema(pool: &PgPool, stop: &CancellationToken) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new("checking the schema at start");
    let health = Health::default();
    loop {
        match db::check_migrated(pool).await {
            Ok(()) => return Ok(true),
            // A certificate that does not verify is not waited out: the URL must change.
            Err(e) if db::config_error(&e).is_some() => return Err(e),
            Err(e) => {
                // A missing schema is for the operator to fix; a database that is down is
                // waited for.
                let Some(delay) = e
                    .chain()
                    .filter_map(|c| c.downcast_ref::<sqlx::Error>())
                    .find(|s| db::is_transient(s))
                    .map(|s| backoff.failed(s, &health))
                else {
                    return Err(e);
                };
                tokio::select! {
                    _ = stop.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// `run --replay-failed --dry-run`: the rows a replay with these filters would put back.
async fn replay_dry_run(store: &Store, filter: &Binds) -> anyhow::Result<u8> {
    let rows = store
        .replay_plan(filter)
        .await
        .context("reading the failed rows a replay would take")?;
    print!("{}", crate::inspect::dead_letter_table(&rows));
    println!(
        "replay dry run: {} failed rows would go back to pending. Nothing was changed.",
        rows.len()
    );
    Ok(exit::OK)
}

/// `run --dry-run`: what would be sent for the due rows, personal values redacted.
async fn dry_run(store: &Store, limit: u32) -> anyhow::Result<u8> {
    let (rows, due) = store.peek_due(limit).await.context("reading due rows")?;
    let (mut valid, mut invalid) = (0u64, 0u64);
    for row in &rows {
        let line = match profile::map_row(row) {
            Ok(req) => {
                valid += 1;
                serde_json::json!({
                    "outbox_id": row.id,
                    "customer_id": row.customer_id,
                    "would_send": profile::redacted(&req),
                })
            }
            Err(e) => {
                invalid += 1;
                serde_json::json!({
                    "outbox_id": row.id,
                    "customer_id": profile::LogId(&row.customer_id).to_string(),
                    "would_fail": {"error_code": ErrorCode::InvalidProfile.as_str(), "field": e.field, "message": e.to_string()},
                })
            }
        };
        println!("{line}");
    }
    let shown = rows.len() as u64;
    println!(
        "dry run: {due} due rows; {shown} to send after coalescing ({} older rows would be superseded); {valid} valid, {invalid} invalid{}. Nothing was changed or sent.",
        due.saturating_sub(shown),
        if shown == u64::from(limit) {
            format!(" (first {limit} shown)")
        } else {
            String::new()
        }
    );
    Ok(exit::OK)
}

//! `imprint-sync demo`: a newcomer's first run. A throwaway database, the sandbox in-process
//! with a few faults, seeded profile changes (several versions of some customers, a few
//! invalid rows), the engine until drained, and a summary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::SecretString;
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::config::Settings;
use crate::db::{self, ScratchDatabase};
use crate::engine::{Engine, EngineSettings, RunMode, Summary};
use crate::imprint::{Client, ClientSettings};
use crate::outbox::store::Store;
use crate::sandbox::{self, Faults};

const DEMO_KEY: &str = "demo-key";
/// The one customer the demo's sandbox answers 404 for.
const UNKNOWN_CUSTOMER: &str = "DEAD0000-0000-4000-8000-000000000404";

/// Runs the demo against the configured PostgreSQL server (a database of its own).
pub async fn demo(settings: &Settings, args: DemoArgs) -> anyhow::Result<u8> {
    let server = &settings.database.url;
    println!(
        "imprint-sync demo: PostgreSQL at {}",
        crate::config::redact_database_url(server)
    );
    let scratch = ScratchDatabase::create(server, "imprint_sync_demo")
        .await
        .context(
            "creating the demo database (is PostgreSQL running and may this user CREATE DATABASE?)",
        )?;
    println!("  throwaway database {} created and migrated", scratch.name);
    let result = run_demo(settings, &scratch, &args).await;
    if args.keep {
        println!(
            "  kept the database: {}",
            crate::config::redact_database_url(&scratch.url)
        );
    } else if let Err(e) = scratch.drop_now().await {
        eprintln!("warning: could not drop {}: {e:#}", scratch.name);
    } else {
        println!("  dropped {} (use --keep to look around)", scratch.name);
    }
    result
}

async fn run_demo(
    settings: &Settings,
    scratch: &ScratchDatabase,
    args: &DemoArgs,
) -> anyhow::Result<u8> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(db::connect_options(&scratch.url)?)
        .await?;
    let faults = Faults {
        latency_ms: 2,
        fail_rate: 0.03,
        rate_limit: Some(3_000.0),
        not_found: HashSet::from([UNKNOWN_CUSTOMER.to_owned()]),
        ..Faults::default()
    };
    let sandbox = sandbox::spawn_local(DEMO_KEY, faults).await?;
    println!(
        "  sandbox at {} (3 % answered 500, a limit of 3,000 requests/s, one customer unknown)",
        sandbox.base_url()
    );
    let seeded = seed(&pool, args.rows).await?;
    println!(
        "  seeded {} profile changes for {} customers: {} are newer versions of a customer \
         (the older ones get superseded), {} carry an invalid field on purpose",
        seeded.rows,
        seeded.customers,
        seeded.rows.saturating_sub(seeded.customers),
        seeded.invalid.len()
    );

    let mut demo_settings = settings.clone();
    demo_settings.rate_limit.requests_per_second = 4_000.0;
    demo_settings.rate_limit.burst = 200;
    demo_settings.sync.concurrency = 32;
    demo_settings.sync.backoff_base_ms = 20;
    demo_settings.sync.backoff_max_ms = 500;
    let client = Client::new(ClientSettings {
        base_url: sandbox.base_url(),
        key: SecretString::from(DEMO_KEY),
        merchant_key: None,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        pool_size: 32,
        max_retry_after: Duration::from_secs(2),
    })?;
    let engine = Engine::with_mode(
        pool.clone(),
        client,
        demo_settings.traffic(),
        EngineSettings::from_settings(&demo_settings),
        format!("demo-{}", std::process::id()),
        RunMode { once: true },
    );
    let store = engine.store().clone();
    let started = Instant::now();
    let bar = progress(seeded.rows);
    let stop = CancellationToken::new();
    let ticker = tokio::spawn(track(store.clone(), bar.clone(), stop.clone()));
    let summary = engine.run(CancellationToken::new()).await;
    stop.cancel();
    let _ = ticker.await;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    print_summary(&store, &summary, &seeded, elapsed, &sandbox.stats()).await?;
    print_states(&pool).await?;
    pool.close().await;
    Ok(crate::exit::OK)
}

struct Seeded {
    rows: u64,
    customers: u64,
    /// Ids of the rows invalid on purpose (a fresh database: ids are 1..=rows, in order).
    invalid: Vec<i64>,
}

/// Seeds realistic profile changes in one statement: ~60 % of rows start a customer, the
/// rest are later versions of one; 2 % of rows are invalid in one field.
async fn seed(pool: &sqlx::PgPool, rows: u32) -> anyhow::Result<Seeded> {
    let customers = (u64::from(rows) * 3 / 5).max(1);
    let r = sqlx::query(
        r#"
WITH g AS (
    SELECT n, (n % $2) AS c FROM generate_series(1, $1::bigint) AS n
)
INSERT INTO imprint_sync.customer_outbox
    (customer_id, email, phone, first_name, last_name, preferred_language, street_line1,
     city, state, postal_code, country, account_tenure, ltv_amount, ltv_currency,
     loyalty_tier, transaction_count, metadata)
SELECT
    CASE WHEN c = 7 THEN $3
         ELSE upper(md5('demo' || c)::uuid::text) END,
    CASE WHEN n % 200 = 3 THEN 'not-an-email' ELSE 'customer' || c || '+v' || n || '@example.com' END,
    CASE WHEN n % 200 = 53 THEN '+0123' ELSE '+1415555' || lpad((c % 10000)::text, 4, '0') END,
    (ARRAY['Ada','Grace','Alan','Edsger','Barbara','Ken','Margaret','Linus'])[1 + c % 8],
    (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Thompson','Hamilton'])[1 + c % 7],
    'en',
    (100 + c % 900) || ' Main St',
    (ARRAY['San Francisco','New York','Austin','Seattle'])[1 + c % 4],
    (ARRAY['CA','NY','TX','WA'])[1 + c % 4],
    lpad((10000 + c % 89999)::text, 5, '0'),
    CASE WHEN n % 200 = 103 THEN 'US' ELSE 'USA' END,
    (c % 120)::int,
    (n * 137 % 500000)::bigint,
    'USD',
    (ARRAY['BASIC','SILVER','GOLD','PLATINUM'])[1 + n % 4],
    (n % 400)::bigint,
    CASE WHEN n % 200 = 153 THEN '[1, 2]'::jsonb ELSE jsonb_build_object('version', n) END
FROM g
ORDER BY n
"#,
    )
    .bind(i64::from(rows))
    .bind(i64::try_from(customers).unwrap_or(i64::MAX))
    .bind(UNKNOWN_CUSTOMER)
    .execute(pool)
    .await
    .context("seeding the demo outbox")?;
    Ok(Seeded {
        rows: r.rows_affected(),
        customers,
        invalid: (1..=i64::from(rows))
            .filter(|n| matches!(n % 200, 3 | 53 | 103 | 153))
            .collect(),
    })
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("  {bar:40.cyan/blue} {pos}/{len} rows finished {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Moves the bar from the database: rows no longer pending or in flight are finished.
async fn track(store: Store, bar: ProgressBar, stop: CancellationToken) {
    let total = bar.length().unwrap_or(0);
    loop {
        if let Ok(g) = store.gauges().await {
            bar.set_position(total.saturating_sub(u64::try_from(g.pending).unwrap_or(0)));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The summary: every seeded row is counted once, as synced, superseded or failed; the rows
/// invalid on purpose are either superseded (a newer valid version came) or failed.
async fn print_summary(
    store: &Store,
    s: &Summary,
    seeded: &Seeded,
    elapsed: Duration,
    api: &sandbox::Stats,
) -> anyhow::Result<()> {
    let status = store.status().await?;
    let count = |state: &str| status.counts.get(state).copied().unwrap_or(0);
    // The others are the failed `invalid_profile` rows, listed under failed.
    let invalid_superseded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_outbox
         WHERE id = ANY($1) AND sync_status = 'superseded'",
    )
    .bind(&seeded.invalid)
    .fetch_one(store.pool())
    .await?;
    let secs = elapsed.as_secs_f64();
    println!();
    println!("  {:<34} {:>8}", "rows seeded", seeded.rows);
    println!("  {:<34} {:>8}", "synced", count("synced"));
    println!(
        "  {:<34} {:>8}",
        "superseded (older versions)",
        count("superseded")
    );
    println!(
        "    {:<32} {:>8}",
        "of them invalid on purpose", invalid_superseded
    );
    println!("  {:<34} {:>8}", "failed", count("failed"));
    for (code, n) in &status.failed_by_error_code {
        println!("    {code:<32} {n:>8}");
    }
    println!(
        "  {:<34} {:>8}",
        "synced + superseded + failed",
        count("synced") + count("superseded") + count("failed")
    );
    println!("  {:<34} {:>8}", "retries (500s, then synced)", s.retried);
    println!(
        "  {:<34} {:>8}",
        "answered 429 (slowed, retried)", s.rate_limited
    );
    println!(
        "  {:<34} {:>8}",
        "requests the API received", api.requests_total
    );
    println!(
        "  {:<34} {:>8.0}",
        "rows/s",
        seeded.rows as f64 / secs.max(0.001)
    );
    println!("  {:<34} {:>7.2}s", "elapsed", secs);
    Ok(())
}

/// Three rows of `customer_sync_state`: Imprint's view, without ssn4 and date_of_birth.
async fn print_states(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT customer_id, last_synced_outbox_id, statuses::text AS statuses,
                (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(accepted) k)
                    AS accepted,
                (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(response) k) AS fields
         FROM imprint_sync.customer_sync_state ORDER BY last_synced_outbox_id DESC LIMIT 3",
    )
    .fetch_all(pool)
    .await?;
    println!(
        "\n  customer_sync_state (3 rows; Imprint's answer stored once, without ssn4 and date_of_birth):"
    );
    for r in rows {
        let id: String = r.try_get("customer_id")?;
        let last: i64 = r.try_get("last_synced_outbox_id")?;
        let statuses: Option<String> = r.try_get("statuses")?;
        let fields: Option<String> = r.try_get("fields")?;
        println!(
            "    {id}  last_synced_outbox_id={last}  statuses={}",
            statuses.unwrap_or_default()
        );
        let accepted: Option<String> = r.try_get("accepted")?;
        println!(
            "      accepted (the columns sent): {}",
            accepted.unwrap_or_default()
        );
        println!(
            "      response (the rest of the answer): {}",
            fields.unwrap_or_default()
        );
    }
    Ok(())
}

//! The drain benchmark: `cargo bench --bench drain [-- --rows N] [-- --history N]`.
//!
//! Seeds N rows (distinct customers) into a fresh database, starts the sandbox (no latency,
//! no limit) in this process, runs the daemon binary `run --once` as a child process until
//! drained, and prints one line per figure:
//! - rows/s of the drain, and the sandbox's raw HTTP rate at the same concurrency (a plain
//!   client loop posting the same bodies, no database), and their ratio;
//! - enqueue -> synced p50/p99 for an idle daemon fed one row at a time;
//! - the daemon's peak RSS;
//! - database statements (transactions) per row;
//! - the drain again with H synced rows of history in the table, and the slowdown.
//!
//! The figures go to `bench/results.md` too, with the machine's core count.

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imprint_sync::db::ScratchDatabase;
use imprint_sync::sandbox::{self, Faults};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const KEY: &str = "bench-key";
const CONCURRENCY: usize = 64;

struct Args {
    rows: u64,
    history: u64,
    idle_rows: u64,
}

fn args() -> Args {
    let mut a = Args {
        rows: 50_000,
        history: 1_000_000,
        idle_rows: 200,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = || argv.get(i + 1).and_then(|v| v.parse().ok());
        match argv[i].as_str() {
            "--rows" => a.rows = next().expect("--rows N"),
            "--history" => a.history = next().expect("--history N"),
            "--idle-rows" => a.idle_rows = next().expect("--idle-rows N"),
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    a
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args();
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let sandbox = sandbox::spawn_local(KEY, Faults::default()).await?;
    let mut out = String::new();
    let mut line = |s: String| {
        println!("{s}");
        let _ = writeln!(out, "- {s}");
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    line(format!(
        "machine: {cores} cores; rows {}; history {}",
        args.rows, args.history
    ));

    // 1. The raw HTTP rate at the same concurrency, no database.
    let raw = raw_http_rate(&sandbox.base_url(), args.rows.min(50_000)).await?;
    line(format!(
        "raw HTTP rate (plain client, {CONCURRENCY} in flight): {raw:.0} requests/s"
    ));

    // 2. The drain.
    let db = ScratchDatabase::create(&server, "imprint_sync_bench").await?;
    let pool = connect(&db.url).await?;
    seed(&pool, args.rows, "D").await?;
    let first = drain(&db.url, &sandbox.base_url(), &pool, args.rows).await?;
    line(format!(
        "drain: {} rows in {:.2} s = {:.0} rows/s ({:.2} x the raw HTTP rate)",
        args.rows,
        first.seconds,
        first.rate,
        first.rate / raw
    ));
    line(format!(
        "daemon peak RSS while draining: {:.1} MB",
        first.peak_rss_kb as f64 / 1024.0
    ));
    line(format!(
        "database statements per row: {:.2} ({} transactions for {} rows)",
        first.transactions as f64 / args.rows as f64,
        first.transactions,
        args.rows
    ));

    // 3. Idle latency: one row at a time into a running daemon.
    let (p50, p99) = idle_latency(&db.url, &sandbox.base_url(), &pool, args.idle_rows).await?;
    line(format!(
        "idle enqueue -> synced ({} rows, one at a time): p50 {:.1} ms, p99 {:.1} ms",
        args.idle_rows, p50, p99
    ));

    // 4. The same drain with synced history in the table.
    if args.history > 0 {
        history(&pool, args.history).await?;
        seed(&pool, args.rows, "H").await?;
        let with = drain(&db.url, &sandbox.base_url(), &pool, args.rows).await?;
        line(format!(
            "drain with {} synced rows of history: {:.0} rows/s ({:+.1} % vs without)",
            args.history,
            with.rate,
            (with.rate / first.rate - 1.0) * 100.0
        ));
    }
    pool.close().await;
    db.drop_now().await?;

    std::fs::create_dir_all("bench")?;
    let mut md = String::from("# Benchmark results\n\nMeasured by `cargo bench --bench drain`");
    let _ = writeln!(
        md,
        " on {} (`nproc` = {cores}).\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    md.push_str(&out);
    std::fs::write("bench/results.md", md)?;
    println!("written to bench/results.md");
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(4).connect(url).await?)
}

/// N pending rows, one per customer, with a realistic profile.
async fn seed(pool: &PgPool, rows: u64, prefix: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO imprint_sync.customer_outbox
           (customer_id, email, phone, first_name, last_name, city, state, postal_code, country,
            account_tenure, ltv_amount, ltv_currency, metadata)
         SELECT $2 || lpad(g::text, 10, '0'), 'c' || g || '@example.com', '+14155550100',
                'Ada', 'Lovelace', 'Oakland', 'CA', '94607', 'USA', 12, 34000, 'USD',
                jsonb_build_object('v', g)
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(rows as i64)
    .bind(prefix)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE imprint_sync.customer_outbox")
        .execute(pool)
        .await?;
    Ok(())
}

/// H synced rows of history (and their sync state), as a long-running deployment has.
async fn history(pool: &PgPool, rows: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO imprint_sync.customer_outbox
           (customer_id, email, sync_status, attempts, synced_at, updated_at, last_http_status)
         SELECT 'OLD' || g, 'c' || g || '@example.com', 'synced', 1, now(), now(), 200
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(rows as i64)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE imprint_sync.customer_outbox")
        .execute(pool)
        .await?;
    Ok(())
}

struct Drain {
    seconds: f64,
    rate: f64,
    peak_rss_kb: u64,
    transactions: i64,
}

fn daemon(db_url: &str, base: &url::Url) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imprint-sync"));
    cmd.env("DATABASE_URL", db_url)
        .env("IMPRINT_SYNC__API__BASE_URL", base.as_str())
        .env("IMPRINT_SYNC__API__KEY", KEY)
        .env("IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND", "1000000")
        .env("IMPRINT_SYNC__RATE_LIMIT__BURST", "10000")
        .env("IMPRINT_SYNC__SYNC__CONCURRENCY", CONCURRENCY.to_string())
        .env("IMPRINT_SYNC__ADMIN__LISTEN", "127.0.0.1:0")
        .env("IMPRINT_SYNC__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

async fn transactions(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

async fn drain(db_url: &str, base: &url::Url, pool: &PgPool, rows: u64) -> anyhow::Result<Drain> {
    let before = transactions(pool).await?;
    let started = Instant::now();
    let mut child = daemon(db_url, base).arg("run").arg("--once").spawn()?;
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        peak = peak.max(rss_kb(pid));
        if let Some(s) = child.try_wait()? {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "the daemon exited with {status}");
    // The stats collector reports with a small delay.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let transactions = transactions(pool).await? - before;
    let synced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'synced' AND synced_at > now() - make_interval(secs => $1)",
    )
    .bind(seconds + 5.0)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(synced as u64 >= rows, "only {synced} of {rows} rows synced");
    Ok(Drain {
        seconds,
        rate: rows as f64 / seconds,
        peak_rss_kb: peak,
        transactions,
    })
}

/// VmHWM (peak resident set) of a process, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn idle_latency(
    db_url: &str,
    base: &url::Url,
    pool: &PgPool,
    rows: u64,
) -> anyhow::Result<(f64, f64)> {
    let mut child = daemon(db_url, base).arg("run").spawn()?;
    // Let it start and go idle.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..rows {
        sqlx::query("INSERT INTO imprint_sync.customer_outbox (customer_id, email) VALUES ($1, 'idle@example.com')")
            .bind(format!("IDLE{i:06}"))
            .execute(pool)
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut lat: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM synced_at - enqueued_at)::float8 * 1000
         FROM imprint_sync.customer_outbox WHERE customer_id LIKE 'IDLE%' AND sync_status = 'synced'",
    )
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(
        lat.len() as u64 == rows,
        "only {} of {rows} idle rows synced",
        lat.len()
    );
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

/// A plain client loop: `CONCURRENCY` tasks posting the same bodies as the drain.
async fn raw_http_rate(base: &url::Url, requests: u64) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;
    let body = serde_json::json!({
        "email": "c1@example.com", "phone": "+14155550100", "first_name": "Ada",
        "last_name": "Lovelace", "city": "Oakland", "state": "CA", "postal_code": "94607",
        "customer_history": {"email": "c1@example.com", "phone": "+14155550100",
            "first_name": "Ada", "last_name": "Lovelace",
            "address": {"city": "Oakland", "state": "CA", "postal_code": "94607", "country": "USA"},
            "account_tenure": 12, "ltv_amount": 34000, "ltv_currency": "USD"},
        "metadata": {"v": 1}
    })
    .to_string();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, body, next, base) = (client.clone(), body.clone(), next.clone(), base.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return Ok::<_, anyhow::Error>(());
                }
                let url = base.join(&format!("v2/customers/RAW{i:010}"))?;
                let resp = client
                    .post(url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                anyhow::ensure!(resp.status().is_success(), "raw request: {}", resp.status());
                resp.bytes().await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}

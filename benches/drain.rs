//! The drain benchmark: `cargo bench --bench drain [-- OPTIONS]`.
//!
//! Seeds rows the way a new partner's table looks — customer ids are random upper-case UUIDs
//! (Imprint's), and no `ANALYZE` after the seed (a bulk insert does not trigger autovacuum's
//! analyze until 10 % of the table changed) — starts the sandbox (no latency, no limit) in
//! this process, runs the daemon binary `run --once` as a child process until drained, and
//! prints, per case:
//! - rows/s, and its ratio to the sandbox's raw HTTP rate measured in the same run (a plain
//!   client loop posting the same bodies at the same concurrency, no database);
//! - database time per synced row: the `pg_stat_database.active_time` delta of the bench's
//!   own database (every session of the daemon; a session's time is flushed when it ends,
//!   and the daemon has exited when it is read);
//! - WAL bytes per synced row, after a `CHECKPOINT`: the cluster-wide `pg_current_wal_lsn()`
//!   delta (includes whatever else the server wrote meanwhile), and, with `pg_walinspect`,
//!   only the records of the bench's database, split by transaction kind and relation;
//! - claim work per claimed row: the claim statement under `EXPLAIN (ANALYZE, FORMAT JSON)`
//!   by `Store::claim_measured` on the seeded table (summed by `imprint_sync::outbox::plan::work`; the claimed rows are then given back);
//! - updates of the outbox and how many were HOT; peak RSS of the daemon; idle
//!   insert -> synced p50/p99.
//!
//! Cases: the plain drain (`--rows`, default 20,000 pending rows), the same analyzed
//! (`--analyze`), and the bulk import (`--history` synced rows, default 1,000,000, then
//! `--bulk-rows` pending, default 100,000; the history is analyzed as autovacuum would have
//! by then, the new rows are not). A drain that exceeds `--max-seconds` (default 180) is
//! stopped and its rate is that of the rows synced so far. `--statement-log PATH` (the
//! server's log file, readable by this process) sets `log_min_duration_statement = 0` on the
//! bench database only (parameters never logged) and adds database time per statement kind.
//! `--explain` (needs `--statement-log`) adds, in the bulk-import case, the plan of every
//! statement of one real claim with `EXPLAIN (ANALYZE, BUFFERS)` figures, logged by
//! `auto_explain` in the claiming session and read back from the server log.
//!
//! The figures go to `bench/results.md` too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imprint_sync::db::ScratchDatabase;
use imprint_sync::sandbox::{self, Faults};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};

const KEY: &str = "bench-key";
const CONCURRENCY: usize = 64;
const BATCH: u32 = 500;
/// Everything from this line on in `bench/results.md` is kept when the figures are rewritten.
const NOTES_MARKER: &str = "<!-- notes: kept by the benchmark -->";

struct Args {
    rows: u64,
    history: u64,
    bulk_rows: u64,
    idle_rows: u64,
    max_seconds: u64,
    analyze: bool,
    explain: bool,
    statement_log: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        rows: 20_000,
        history: 1_000_000,
        bulk_rows: 100_000,
        idle_rows: 200,
        max_seconds: 180,
        analyze: false,
        explain: false,
        statement_log: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = || argv.get(i + 1).and_then(|v| v.parse().ok());
        match argv[i].as_str() {
            "--rows" => a.rows = next().expect("--rows N"),
            "--history" => a.history = next().expect("--history N"),
            "--bulk-rows" => a.bulk_rows = next().expect("--bulk-rows N"),
            "--idle-rows" => a.idle_rows = next().expect("--idle-rows N"),
            "--max-seconds" => a.max_seconds = next().expect("--max-seconds N"),
            "--analyze" => a.analyze = true,
            "--explain" => a.explain = true,
            "--statement-log" => {
                a.statement_log = Some(argv.get(i + 1).cloned().expect("--statement-log PATH"))
            }
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    a
}

/// The shared state of one run: the server, the sandbox, the raw HTTP rate.
struct Bench {
    server: String,
    base: url::Url,
    max_seconds: u64,
    statement_log: Option<String>,
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
        let _ = writeln!(out, "{s}");
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    line(format!(
        "machine: {cores} cores, load average at start {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));

    // The raw HTTP rate at the same concurrency, no database.
    let raw = raw_http_rate(&sandbox.base_url(), 50_000).await?;
    line(format!(
        "raw HTTP rate (plain client, {CONCURRENCY} in flight, 50,000 requests): {raw:.0} requests/s\n"
    ));
    let bench = Bench {
        server,
        base: sandbox.base_url(),
        max_seconds: args.max_seconds,
        statement_log: args.statement_log.clone(),
    };

    let mut cases = vec![(format!("{} pending, not analyzed", args.rows), false)];
    if args.analyze {
        cases.push((format!("{} pending, analyzed", args.rows), true));
    }
    let mut plain_rate = None;
    let mut sample = None;
    for (name, analyze) in cases {
        let db = ScratchDatabase::create(&bench.server, "imprint_sync_bench").await?;
        let pool = connect(&db.url).await?;
        seed_pending(&pool, args.rows).await?;
        if analyze {
            sqlx::query("ANALYZE imprint_sync.customer_outbox")
                .execute(&pool)
                .await?;
        }
        let fig = bench.case(&db, pool, args.rows, false).await?;
        for l in fig.lines(&name, raw, None) {
            line(l);
        }
        if !analyze {
            plain_rate = Some(fig.rate);
            let pool = connect(&db.url).await?;
            sample = Some(sync_state_sample(&pool).await?);
            if args.idle_rows > 0 {
                let (p50, p99) = idle_latency(&db.url, &bench.base, &pool, args.idle_rows).await?;
                line(format!(
                    "- idle insert -> synced ({} rows, one every 20 ms): p50 {p50:.1} ms, p99 {p99:.1} ms",
                    args.idle_rows
                ));
            }
            pool.close().await;
        }
        line(String::new());
        db.drop_now().await?;
    }

    if args.history > 0 && args.bulk_rows > 0 {
        let db = ScratchDatabase::create(&bench.server, "imprint_sync_bench").await?;
        let pool = connect(&db.url).await?;
        let seeding = Instant::now();
        seed_history(&pool, args.history, sample.as_ref()).await?;
        sqlx::query("ANALYZE imprint_sync.customer_outbox")
            .execute(&pool)
            .await?;
        sqlx::query("ANALYZE imprint_sync.customer_sync_state")
            .execute(&pool)
            .await?;
        seed_pending(&pool, args.bulk_rows).await?;
        println!(
            "(bulk import seeded in {:.0} s)",
            seeding.elapsed().as_secs_f64()
        );
        let fig = bench.case(&db, pool, args.bulk_rows, args.explain).await?;
        let name = format!(
            "bulk import: {} synced rows (analyzed), then {} pending inserted (not analyzed)",
            args.history, args.bulk_rows
        );
        for l in fig.lines(&name, raw, plain_rate) {
            line(l);
        }
        db.drop_now().await?;
    }

    std::fs::create_dir_all("bench")?;
    let mut md = String::from("# Benchmark results\n\nMeasured by `cargo bench --bench drain");
    let given: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if !given.is_empty() {
        let _ = write!(md, " -- {}", given.join(" "));
    }
    let _ = writeln!(
        md,
        "` on {} (`nproc` = {cores}).\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    md.push_str(&out);
    // Hand-written notes (a profile, proposals) below the marker survive a new run.
    if let Ok(old) = std::fs::read_to_string("bench/results.md")
        && let Some(at) = old.find(NOTES_MARKER)
    {
        md.push('\n');
        md.push_str(&old[at..]);
    }
    std::fs::write("bench/results.md", md)?;
    println!("written to bench/results.md");
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(2).connect(url).await?)
}

/// The profile columns every seeded row carries (a realistic width).
const PROFILE: &str = "'c' || g || '@example.com', '+14155550100', 'Ada', 'Lovelace', \
    'Oakland', 'CA', '94607', 'USA', 12, 34000, 'USD', jsonb_build_object('v', g)";
const PROFILE_COLUMNS: &str = "email, phone, first_name, last_name, city, state, postal_code, \
    country, account_tenure, ltv_amount, ltv_currency, metadata";

/// N pending rows, one per customer, customer ids random upper-case UUIDs. Not analyzed.
async fn seed_pending(pool: &PgPool, rows: u64) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, {PROFILE_COLUMNS})
         SELECT upper(gen_random_uuid()::text), {PROFILE}
         FROM generate_series(1, $1::bigint) g"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(rows as i64)
        .execute(pool)
        .await?;
    Ok(())
}

/// What a real write-back stored for one customer (statuses, response, accepted), so the
/// seeded history has the width a drained one has.
type SyncStateSample = (Option<String>, Option<String>, Option<String>);

async fn sync_state_sample(pool: &PgPool) -> anyhow::Result<SyncStateSample> {
    let row = sqlx::query(
        "SELECT statuses::text, response::text, accepted::text
         FROM imprint_sync.customer_sync_state LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// H synced rows of history and their sync state, written directly in one statement (not by
/// draining), as a long-running deployment has them.
async fn seed_history(
    pool: &PgPool,
    rows: u64,
    sample: Option<&SyncStateSample>,
) -> anyhow::Result<()> {
    let sql = format!(
        "WITH o AS (
            INSERT INTO imprint_sync.customer_outbox
              (customer_id, {PROFILE_COLUMNS}, sync_status, attempts, synced_at, updated_at,
               last_http_status)
            SELECT upper(gen_random_uuid()::text), {PROFILE}, 'synced', 1, now(), now(), 200
            FROM generate_series(1, $1::bigint) g
            RETURNING id, customer_id
         )
         INSERT INTO imprint_sync.customer_sync_state
           (customer_id, last_synced_outbox_id, last_synced_at, imprint_updated_at, statuses,
            response, accepted)
         SELECT customer_id, id, now(), now(), $2::jsonb, COALESCE($3::jsonb, '{{}}'), $4::jsonb
         FROM o"
    );
    let (statuses, response, accepted) = sample.cloned().unwrap_or_default();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(rows as i64)
        .bind(statuses)
        .bind(response)
        .bind(accepted)
        .execute(pool)
        .await?;
    Ok(())
}

/// The figures of one case.
struct Figures {
    pending: u64,
    synced: u64,
    seconds: f64,
    stopped: bool,
    rate: f64,
    peak_rss_kb: u64,
    transactions: i64,
    db_ms: f64,
    wal_cluster: i64,
    wal: Option<Vec<WalRow>>,
    outbox_upd: i64,
    outbox_hot: i64,
    work: Work,
    statements: Option<BTreeMap<String, (u64, f64)>>,
    /// `--explain`: the plans of one claim's statements, rendered.
    plans: Vec<String>,
}

impl Figures {
    fn lines(&self, name: &str, raw: f64, plain_rate: Option<f64>) -> Vec<String> {
        let n = self.synced.max(1) as f64;
        let mut v = vec![format!("## {name}\n")];
        let stopped = if self.stopped {
            format!(
                " — stopped after {:.0} s with {} of {} rows synced",
                self.seconds, self.synced, self.pending
            )
        } else {
            String::new()
        };
        v.push(format!(
            "- drain: {} rows in {:.2} s = **{:.0} rows/s** = **{:.2} x** the raw HTTP rate{stopped}",
            self.synced, self.seconds, self.rate, self.rate / raw
        ));
        if let Some(p) = plain_rate {
            v.push(format!(
                "- vs the plain drain without history: **{:.2} x**",
                self.rate / p
            ));
        }
        v.push(format!(
            "- database time per synced row: **{:.3} ms** (active_time delta {:.0} ms over {} rows)",
            self.db_ms / n,
            self.db_ms,
            self.synced
        ));
        v.push(format!(
            "- WAL per synced row, cluster-wide LSN delta after a CHECKPOINT: {:.0} B ({:.1} MB; includes other databases' writes)",
            self.wal_cluster as f64 / n,
            self.wal_cluster as f64 / 1e6
        ));
        if let Some(wal) = &self.wal {
            let total: i64 = wal.iter().map(|r| r.bytes).sum();
            let fpi: i64 = wal.iter().map(|r| r.fpi).sum();
            v.push(format!(
                "- WAL per synced row, this database's records only (pg_walinspect): **{:.0} B** (of which full-page images {:.0} B)",
                total as f64 / n,
                fpi as f64 / n
            ));
            let mut by_kind: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
            for r in wal {
                let e = by_kind.entry(r.kind.as_str()).or_default();
                e.0 += r.bytes;
                e.1 += r.fpi;
            }
            for (k, (b, f)) in by_kind {
                v.push(format!(
                    "  - {k}: {:.0} B/row (FPI {:.0} B/row)",
                    b as f64 / n,
                    f as f64 / n
                ));
            }
        }
        v.push(format!(
            "- claim work per claimed row (EXPLAIN ANALYZE of each claim statement): **{:.1}** ({:.0} rows of work for {} claimed, {:.0} ms)",
            self.work.total / self.work.claimed.max(1) as f64,
            self.work.total,
            self.work.claimed,
            self.work.ms,
        ));
        v.push(format!(
            "- outbox updates: {} ({:.2} per synced row), HOT: {}",
            self.outbox_upd,
            self.outbox_upd as f64 / n,
            self.outbox_hot
        ));
        v.push(format!(
            "- transactions per synced row: {:.3} ({})",
            self.transactions as f64 / n,
            self.transactions
        ));
        v.push(format!(
            "- daemon peak RSS: {:.1} MB",
            self.peak_rss_kb as f64 / 1024.0
        ));
        if let Some(st) = &self.statements {
            let total: f64 = st.values().map(|(_, ms)| ms).sum();
            v.push(format!(
                "- statement log (parse+bind+execute durations, {total:.0} ms in all):"
            ));
            let mut rows: Vec<_> = st.iter().collect();
            rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
            for (k, (calls, ms)) in rows.into_iter().take(12) {
                v.push(format!(
                    "  - {k}: {calls} calls, {ms:.0} ms = {:.0} % = {:.3} ms/synced row",
                    ms / total.max(1e-9) * 100.0,
                    ms / n
                ));
            }
        }
        if !self.plans.is_empty() {
            v.push("- one claim's statements with `EXPLAIN (ANALYZE, BUFFERS)` figures (auto_explain, JSON rendered as a tree; buffers: shared hit/read/dirtied/written):".into());
            v.push(String::new());
            v.push("  ```".into());
            v.extend(self.plans.iter().map(|l| format!("  {l}")));
            v.push("  ```".into());
        }
        if let Some(wal) = &self.wal {
            v.push("- WAL by transaction kind and relation (bytes per synced row; records per synced row; FPI bytes per synced row):".into());
            v.push(String::new());
            v.push("  | kind | relation | record | B/row | records/row | FPI B/row |".into());
            v.push("  |---|---|---|---:|---:|---:|".into());
            for r in wal.iter().filter(|r| r.bytes as f64 / n >= 5.0) {
                v.push(format!(
                    "  | {} | {} | {} | {:.0} | {:.2} | {:.0} |",
                    r.kind,
                    r.relation,
                    r.record,
                    r.bytes as f64 / n,
                    r.count as f64 / n,
                    r.fpi as f64 / n
                ));
            }
        }
        v
    }
}

impl Bench {
    /// Explains the claim, then drains the seeded database and measures it.
    async fn case(
        &self,
        db: &ScratchDatabase,
        pool: PgPool,
        pending: u64,
        explain: bool,
    ) -> anyhow::Result<Figures> {
        let work = explain_claim(&pool).await?;
        println!(
            "(claim work {:.1} per claimed row)",
            work.total / work.claimed.max(1) as f64
        );
        let plans = match (&self.statement_log, explain) {
            (Some(log), true) => explain_plans(&pool, &db.url, log, &db.name).await?,
            _ => Vec::new(),
        };
        let walinspect = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .execute(&pool)
            .await
            .is_ok();
        if self.statement_log.is_some() {
            // The bench's own database only; bind parameters never reach the log.
            for set in [
                "log_min_duration_statement = 0",
                "log_parameter_max_length = 0",
            ] {
                let sql = format!(r#"ALTER DATABASE "{}" SET {set}"#, db.name);
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await?;
            }
        }
        // Ends the bench's own sessions, so their active time is flushed before the start.
        pool.close().await;

        // CHECKPOINT and the WAL-keeping slot go through the server's admin database: the
        // bench database's active time is the daemon's alone.
        let mut admin = PgConnection::connect(&self.server).await?;
        if walinspect {
            // Temporary: dropped when this session ends; it keeps the WAL to inspect.
            sqlx::query("SELECT pg_create_physical_replication_slot($1, true, true)")
                .bind(format!("imprint_bench_{:08x}", rand::random::<u32>()))
                .execute(&mut admin)
                .await?;
        }
        sqlx::query("CHECKPOINT").execute(&mut admin).await?;
        let before = snapshot(&mut admin, &self.server, &db.name).await?;
        let log_start = self
            .statement_log
            .as_deref()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()));

        let started = Instant::now();
        let mut child = daemon(&db.url, &self.base)
            .arg("run")
            .arg("--once")
            .spawn()?;
        let pid = child.id();
        let mut peak = 0;
        let mut stopped = false;
        loop {
            peak = peak.max(rss_kb(pid));
            if let Some(s) = child.try_wait()? {
                anyhow::ensure!(s.success() || stopped, "the daemon exited with {s}");
                break;
            }
            if !stopped && started.elapsed() > Duration::from_secs(self.max_seconds) {
                stopped = true;
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        // Sessions still running a statement of the stopped daemon finish first: their
        // time belongs to the drain.
        wait_sessions_gone(&mut admin, &db.name).await?;
        // The log ends here: what follows is the bench's own reading.
        let log_end = self
            .statement_log
            .as_deref()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let after = snapshot(&mut admin, &self.server, &db.name).await?;

        let pool = connect(&db.url).await?;
        let synced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imprint_sync.customer_outbox
             WHERE sync_status = 'synced' AND synced_at >= $1",
        )
        .bind(before.now)
        .fetch_one(&pool)
        .await?;
        let (outbox_upd, outbox_hot): (i64, i64) = {
            let r = sqlx::query(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                 WHERE relid = 'imprint_sync.customer_outbox'::regclass",
            )
            .fetch_one(&pool)
            .await?;
            (r.try_get(0)?, r.try_get(1)?)
        };
        let wal = if walinspect {
            Some(wal_profile(&pool, &before.lsn, &after.lsn).await?)
        } else {
            None
        };
        pool.close().await;
        admin.close().await?;
        let statements = match (&self.statement_log, log_start, log_end) {
            (Some(path), Some(start), Some(end)) => {
                Some(statement_profile(path, start, end, &db.name)?)
            }
            _ => None,
        };
        Ok(Figures {
            pending,
            synced: u64::try_from(synced).unwrap_or(0),
            seconds,
            stopped,
            rate: synced as f64 / seconds,
            peak_rss_kb: peak,
            transactions: after.xact - before.xact,
            db_ms: after.active_ms - before.active_ms,
            wal_cluster: after.wal_bytes - before.wal_bytes,
            wal,
            outbox_upd: outbox_upd - before.upd,
            outbox_hot: outbox_hot - before.hot,
            work,
            statements,
            plans,
        })
    }
}

/// The server's counters at one moment.
struct Snapshot {
    now: chrono::DateTime<chrono::Utc>,
    lsn: String,
    wal_bytes: i64,
    active_ms: f64,
    xact: i64,
    upd: i64,
    hot: i64,
}

async fn snapshot(admin: &mut PgConnection, server: &str, db: &str) -> anyhow::Result<Snapshot> {
    let r = sqlx::query(
        "SELECT now(), pg_current_wal_lsn()::text,
                pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                d.active_time, d.xact_commit
         FROM pg_stat_database d WHERE d.datname = $1",
    )
    .bind(db)
    .fetch_one(&mut *admin)
    .await?;
    // Table counters are per database: read them there (the bench database is quiet now).
    let mut url = url::Url::parse(server)?;
    url.set_path(db);
    let mut conn = PgConnection::connect(url.as_str()).await?;
    let t = sqlx::query(
        "SELECT COALESCE(sum(n_tup_upd), 0)::bigint, COALESCE(sum(n_tup_hot_upd), 0)::bigint
         FROM pg_stat_user_tables WHERE relid = 'imprint_sync.customer_outbox'::regclass",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(Snapshot {
        now: r.try_get(0)?,
        lsn: r.try_get(1)?,
        wal_bytes: r.try_get(2)?,
        active_ms: r.try_get(3)?,
        xact: r.try_get(4)?,
        upd: t.try_get(0)?,
        hot: t.try_get(1)?,
    })
}

async fn wait_sessions_gone(admin: &mut PgConnection, db: &str) -> anyhow::Result<()> {
    for _ in 0..600 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(db)
            .fetch_one(&mut *admin)
            .await?;
        if n == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("sessions of {db} still open after 60 s")
}

/// The claim's plan work.
#[derive(Default)]
struct Work {
    total: f64,
    claimed: i64,
    ms: f64,
}

/// Runs the daemon's claim once with each of its statements under `EXPLAIN (ANALYZE)`
/// ([`Store::claim_measured`]), then gives the claimed rows back to `pending` untouched.
async fn explain_claim(pool: &PgPool) -> anyhow::Result<Work> {
    let store = imprint_sync::outbox::store::Store::new(pool.clone(), "bench-explain");
    let t0 = std::time::Instant::now();
    let (claim, total) = store.claim_measured(BATCH, Duration::from_secs(60)).await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    give_back(pool, "bench-explain").await?;
    Ok(Work {
        total,
        claimed: claim.rows.len() as i64,
        ms,
    })
}

/// One real claim (`Store::claim`, the daemon's) in a session where `auto_explain` logs
/// every statement's plan with ANALYZE and BUFFERS; the plans are read back from the server
/// log (the part written meanwhile) and rendered as indented trees. The claimed rows are
/// then given back.
async fn explain_plans(
    pool: &PgPool,
    url: &str,
    log: &str,
    db: &str,
) -> anyhow::Result<Vec<String>> {
    let explained = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|c, _| {
            Box::pin(async move {
                sqlx::raw_sql(
                    "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;
                     SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;
                     SET auto_explain.log_format = json",
                )
                .execute(c)
                .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let start = std::fs::metadata(log)?.len();
    let store = imprint_sync::outbox::store::Store::new(explained.clone(), "bench-auto-explain");
    let t0 = std::time::Instant::now();
    let claim = store.claim(BATCH, Duration::from_secs(60)).await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    explained.close().await;
    let end = std::fs::metadata(log)?.len();
    give_back(pool, "bench-auto-explain").await?;

    let text = read_log(log, start, end)?;
    let marker = format!("@{db} LOG:  duration: ");
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![format!(
        "one claim: {} rows claimed in {ms:.0} ms (with auto_explain's timing overhead)",
        claim.rows.len()
    )];
    for (i, l) in lines.iter().enumerate() {
        let Some(pos) = l.find(&marker) else { continue };
        let Some(took) = l[pos + marker.len()..].strip_suffix(" ms  plan:") else {
            continue;
        };
        // The message's continuation lines start with a tab.
        let json: String = lines[i + 1..]
            .iter()
            .take_while(|n| n.starts_with('\t'))
            .map(|n| &n[1..])
            .collect::<Vec<_>>()
            .join("\n");
        let plan: serde_json::Value = serde_json::from_str(&json)?;
        let sql = plan["Query Text"].as_str().unwrap_or("");
        let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push(String::new());
        out.push(format!("{} ({took} ms):", statement_kind(&sql)));
        render_plan(&plan["Plan"], 1, &mut out);
    }
    Ok(out)
}

/// One plan node per line, children indented: node, relation/index, actual rows × loops,
/// rows removed, buffers; then its index condition and filter.
fn render_plan(node: &serde_json::Value, depth: usize, out: &mut Vec<String>) {
    let s = |k: &str| node.get(k).and_then(serde_json::Value::as_str);
    let n = |k: &str| {
        node.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let pad = "  ".repeat(depth);
    let mut l = format!("{pad}-> ");
    if let Some(sub) = s("Subplan Name") {
        let _ = write!(l, "[{sub}] ");
    }
    l.push_str(s("Node Type").unwrap_or("?"));
    if let Some(op) = s("Operation") {
        let _ = write!(l, " ({op})");
    }
    if let Some(ix) = s("Index Name") {
        let _ = write!(l, " using {ix}");
    }
    if let Some(rel) = s("Relation Name") {
        let _ = write!(l, " on {rel}");
    }
    if let Some(f) = s("Function Name") {
        let _ = write!(l, " {f}");
    }
    if let Some(cte) = s("CTE Name") {
        let _ = write!(l, " CTE {cte}");
    }
    let _ = write!(
        l,
        "  (actual time={:.3}..{:.3} rows={} loops={})",
        n("Actual Startup Time"),
        n("Actual Total Time"),
        n("Actual Rows"),
        n("Actual Loops")
    );
    for (k, short) in [
        ("Rows Removed by Filter", "removed by filter"),
        ("Rows Removed by Join Filter", "removed by join filter"),
        ("Rows Removed by Index Recheck", "removed by recheck"),
        ("Heap Fetches", "heap fetches"),
    ] {
        if n(k) > 0.0 {
            let _ = write!(l, " {short}={}", n(k));
        }
    }
    let buffers: Vec<String> = [
        ("Shared Hit Blocks", "hit"),
        ("Shared Read Blocks", "read"),
        ("Shared Dirtied Blocks", "dirtied"),
        ("Shared Written Blocks", "written"),
    ]
    .iter()
    .filter(|(k, _)| n(k) > 0.0)
    .map(|(k, short)| format!("{short}={}", n(k)))
    .collect();
    if !buffers.is_empty() {
        let _ = write!(l, " buffers: {}", buffers.join(" "));
    }
    out.push(l);
    for k in ["Index Cond", "Hash Cond", "Join Filter", "Filter"] {
        if let Some(c) = s(k) {
            let c: String = c.chars().take(160).collect();
            out.push(format!("{pad}     {k}: {c}"));
        }
    }
    for child in node
        .get("Plans")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        render_plan(child, depth + 1, out);
    }
}

/// Puts the rows a measuring claim took back as they were: `pending`, no lease, the claim
/// count it added taken off (else the gate would see them as suspects and the drain would
/// claim them one at a time), and the per-column marks it created removed (the seeded
/// tables have none of their own).
async fn give_back(pool: &PgPool, worker: &str) -> anyhow::Result<()> {
    sqlx::query(
        "WITH back AS (
            UPDATE imprint_sync.customer_outbox
            SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL,
                claims = greatest(claims - 1, 0)
            WHERE sync_status = 'in_flight' AND leased_by = $1
            RETURNING customer_id
         )
         DELETE FROM imprint_sync.customer_claims
         WHERE customer_id IN (SELECT customer_id FROM back)",
    )
    .bind(worker)
    .execute(pool)
    .await?;
    Ok(())
}

/// One line of the WAL profile.
#[derive(sqlx::FromRow)]
struct WalRow {
    kind: String,
    relation: String,
    record: String,
    count: i64,
    bytes: i64,
    fpi: i64,
}

/// The WAL records between two LSNs that belong to this database: records whose block
/// reference names it, and the commit records of transactions that wrote such records.
/// A transaction is a write-back if it wrote `sync_attempts`, a claim if it wrote the outbox
/// otherwise; records without a transaction id (pruning) are their own kind.
async fn wal_profile(pool: &PgPool, from: &str, to: &str) -> anyhow::Result<Vec<WalRow>> {
    let rows = sqlx::query_as::<_, WalRow>(
        r#"
WITH r AS MATERIALIZED (
    SELECT xid::text::bigint AS xid, resource_manager AS rm, record_type AS rt, record_length::bigint AS len,
           fpi_length::bigint AS fpi, regexp_match(block_ref, 'rel \d+/(\d+)/(\d+)') AS m
    FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)
),
ours AS MATERIALIZED (
    SELECT xid, rm, rt, len, fpi, m[2]::oid AS node FROM r
    WHERE m[1]::oid = (SELECT oid FROM pg_database WHERE datname = current_database())
),
names AS (
    SELECT node, COALESCE(c.relname, 'filenode ' || node) AS rel
    FROM (SELECT DISTINCT node FROM ours) n
    LEFT JOIN pg_class c ON c.oid = pg_filenode_relation(0, n.node)
),
kinds AS (
    SELECT o.xid,
           CASE WHEN bool_or(n.rel LIKE 'sync_attempts%') THEN 'write-back'
                WHEN bool_or(n.rel LIKE 'customer_outbox%') THEN 'claim'
                ELSE 'other transactions' END AS kind
    FROM ours o JOIN names n USING (node)
    WHERE o.xid <> 0
    GROUP BY o.xid
),
agg AS (
    SELECT xid, node, rm, rt, count(*) AS cnt, sum(len) AS len, sum(fpi) AS fpi
    FROM ours GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT xid, NULL::oid, rm, rt, count(*), sum(len), sum(fpi)
    FROM r WHERE m IS NULL AND xid IN (SELECT xid FROM kinds) GROUP BY 1, 2, 3, 4
)
SELECT COALESCE(k.kind, 'no transaction (pruning)') AS kind,
       COALESCE(n.rel, '(transaction)') AS relation, a.rm || ' ' || a.rt AS record,
       sum(a.cnt)::bigint AS count, sum(a.len)::bigint AS bytes, sum(a.fpi)::bigint AS fpi
FROM agg a LEFT JOIN kinds k USING (xid) LEFT JOIN names n USING (node)
GROUP BY 1, 2, 3
ORDER BY 1, 5 DESC
"#,
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The part of the server log written between two file lengths.
fn read_log(path: &str, start: u64, end: u64) -> anyhow::Result<String> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(end.saturating_sub(start)).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Database time by statement kind, from the server log written since `start`:
/// `duration:` lines of the bench database (parse, bind and execute each have one).
fn statement_profile(
    path: &str,
    start: u64,
    end: u64,
    db: &str,
) -> anyhow::Result<BTreeMap<String, (u64, f64)>> {
    let text = read_log(path, start, end)?;
    let marker = format!("@{db} LOG:  duration: ");
    let is_prefixed = |l: &str| {
        l.as_bytes().get(4) == Some(&b'-') && l.get(..4).is_some_and(|y| y.parse::<u32>().is_ok())
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(pos) = l.find(&marker) else { continue };
        let rest = &l[pos + marker.len()..];
        let Some((ms, what)) = rest.split_once(" ms  ") else {
            continue;
        };
        let ms: f64 = ms.parse().unwrap_or(0.0);
        let phase = what.split_whitespace().next().unwrap_or("");
        // The statement text: after the first ": ", continued on unprefixed lines.
        let mut sql = what.split_once(": ").map_or("", |x| x.1).to_owned();
        for next in lines[i + 1..]
            .iter()
            .take_while(|n| !is_prefixed(n))
            .take(4)
        {
            sql.push(' ');
            sql.push_str(next);
        }
        let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let kind = statement_kind(&sql);
        let e = out.entry(kind).or_default();
        if phase == "execute" || phase == "statement:" {
            e.0 += 1;
        }
        e.1 += ms;
    }
    Ok(out)
}

/// The name of a statement of the hot path, or its first 70 characters.
fn statement_kind(sql: &str) -> String {
    let claim = [
        ("WITH m AS MATERIALIZED", "claim 4: merge and claim"),
        ("pg_try_advisory_xact_lock", "claim 2: gate"),
        ("next_attempt_at::text AS position", "claim 1: scan"),
        ("SET next_attempt_at = COALESCE(d.until", "claim 3: defer"),
        ("SET LOCAL enable_seqscan", "claim: SET LOCAL"),
        ("WITH input AS", "write-back"),
    ];
    claim
        .iter()
        .find(|(needle, _)| sql.contains(needle))
        .map_or_else(|| sql.chars().take(70).collect(), |(_, k)| (*k).to_owned())
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
    let first: i64 =
        sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM imprint_sync.customer_outbox")
            .fetch_one(pool)
            .await?;
    let mut child = daemon(db_url, base).arg("run").spawn()?;
    // Let it start and go idle.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..rows {
        sqlx::query(
            "INSERT INTO imprint_sync.customer_outbox (customer_id, email)
             VALUES (upper(gen_random_uuid()::text), 'idle@example.com')",
        )
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
         FROM imprint_sync.customer_outbox WHERE id > $1 AND sync_status = 'synced'",
    )
    .bind(first)
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(
        lat.len() as u64 == rows,
        "only {} of {rows} idle rows synced",
        lat.len()
    );
    lat.sort_by(|a, b| a.total_cmp(b));
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index within `lat` (p is in [0, 1])"
    )]
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
                // Random upper-case UUIDs, as the drain's customers.
                let id = uuid_upper();
                let url = base.join(&format!("v2/customers/{id}"))?;
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

/// A random v4 UUID, upper case (no uuid crate needed for a benchmark).
fn uuid_upper() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

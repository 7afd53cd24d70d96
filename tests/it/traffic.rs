//! Traffic control, proved over TCP against the sandbox: the rate limit, 429 adaptation, the
//! circuit breaker, the auth pause, and one rate shared by the replicas.
//!
//! Bounds are generous (the machines running the tests are shared and noisy); no test asserts
//! a tight wall-clock figure. Each rate test prints what it measured (`--nocapture`).

use crate::common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::TestDb;
use imprint_sync::config::Settings;
use imprint_sync::engine::Summary;
use imprint_sync::sandbox::{self, Faults, SandboxHandle, Stats};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const KEY: &str = "traffic-test-key";
/// How long a drain may take under the traffic limits these tests set.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// `n` pending rows, one per customer (no coalescing), each a valid profile.
async fn seed(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email, first_name)
         SELECT 'cust-' || lpad(i::text, 6, '0'), 'c' || i || '@example.com', 'Name' || i
         FROM generate_series(1, $1) AS i",
    )
    .bind(n)
    .execute(pool)
    .await
    .expect("seeding the outbox");
}

/// A fresh database with `rows` rows due, and a sandbox with `faults`.
async fn start(rows: i64, faults: Faults) -> (TestDb, SandboxHandle) {
    let db = TestDb::new().await;
    let api = sandbox::spawn_local(KEY, faults).await.expect("sandbox");
    seed(&db.pool, rows).await;
    (db, api)
}

/// Settings for a run against `sandbox` with `key`; `extra` are `SECTION__KEY` overrides.
/// Unlike `common::test_env`, the shipped traffic defaults (rate limit, retries) apply: they
/// are what these tests measure.
fn settings(db: &TestDb, sandbox: &SandboxHandle, key: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env = vec![
        ("DATABASE_URL".to_owned(), db.url.clone()),
        (
            "IMPRINT_SYNC__API__BASE_URL".to_owned(),
            sandbox.base_url().to_string(),
        ),
        ("IMPRINT_SYNC__API__KEY".to_owned(), key.to_owned()),
        (
            "IMPRINT_SYNC__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| (format!("IMPRINT_SYNC__{k}"), (*v).to_owned())),
    );
    Settings::load_from(None, env).expect("test settings")
}

/// Rows by `sync_status`, and the most attempts any row spent.
async fn outcome(pool: &PgPool) -> (i64, i64, i64, i32) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE sync_status = 'synced'),
                count(*) FILTER (WHERE sync_status = 'failed'),
                count(*) FILTER (WHERE sync_status = 'pending'),
                coalesce(max(attempts), 0)
         FROM imprint_sync.customer_outbox",
    )
    .fetch_one(pool)
    .await
    .expect("reading the outcome")
}

/// The sandbox's request count, sampled every 20 ms while a run goes on.
struct Samples(Vec<(Duration, u64)>);

async fn measure<F: Future>(sandbox: &SandboxHandle, run: F) -> (F::Output, Samples) {
    let start = Instant::now();
    let mut samples = vec![(Duration::ZERO, sandbox.stats().requests_total)];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => {
                samples.push((start.elapsed(), sandbox.stats().requests_total));
                return (out, Samples(samples));
            }
            _ = tick.tick() => samples.push((start.elapsed(), sandbox.stats().requests_total)),
        }
    }
}

impl Samples {
    /// Requests per second from `from` (after the start of the run) to the last request.
    fn rate_from(&self, from: Duration) -> f64 {
        let last = self.0.last().map_or(0, |s| s.1);
        let Some(&(t0, n0)) = self.0.iter().find(|s| s.0 >= from && s.1 > 0) else {
            return 0.0;
        };
        let (t1, _) = *self
            .0
            .iter()
            .find(|s| s.1 == last)
            .expect("the last sample");
        if t1 <= t0 {
            return 0.0;
        }
        (last - n0) as f64 / (t1 - t0).as_secs_f64()
    }

    /// Requests per second from the first request to the last.
    fn rate(&self) -> f64 {
        self.rate_from(Duration::ZERO)
    }

    /// The most requests seen in any one-second window.
    fn peak_per_second(&self) -> u64 {
        let s = &self.0;
        let mut best = 0;
        let mut j = 0;
        for i in 0..s.len() {
            while s[i].0 - s[j].0 > Duration::from_secs(1) {
                j += 1;
            }
            best = best.max(s[i].1 - s[j].1);
        }
        best
    }
}

/// What 400 rows (one per customer) did, sent at `configured` requests per second to a sandbox
/// that allows 100/s.
struct Limited {
    db: TestDb,
    summary: Summary,
    samples: Samples,
    stats: Stats,
    /// Answers that were 429, and their share of all answers.
    limited: u64,
    share: f64,
}

async fn against_a_limit_of_100(configured: &str) -> Limited {
    let faults = Faults {
        rate_limit: Some(100.0),
        ..Faults::default()
    };
    let (db, api) = start(400, faults).await;
    let s = settings(
        &db,
        &api,
        KEY,
        &[("RATE_LIMIT__REQUESTS_PER_SECOND", configured)],
    );
    let engine = common::engine_with(db.pool.clone(), &s, "rate");
    let (summary, samples) = measure(&api, common::drain(&engine, RUN_LIMIT)).await;
    let stats = api.stats();
    let limited = stats.count(429);
    eprintln!(
        "{configured}/s against a 100/s limit: {:.1} requests/s achieved, {} requests, {limited} answered 429 ({:.2} %), peak {} in one second",
        samples.rate(),
        stats.requests_total,
        limited as f64 / stats.requests_total as f64 * 100.0,
        samples.peak_per_second()
    );
    Limited {
        db,
        summary,
        samples,
        share: limited as f64 / stats.requests_total as f64,
        limited,
        stats,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_under_the_apis_limit_is_achieved_without_429s() {
    let Limited {
        db,
        summary,
        samples,
        stats,
        limited,
        share,
    } = against_a_limit_of_100("80").await;
    let rate = samples.rate();
    assert_eq!(summary.synced, 400, "{summary:?}");
    assert_eq!(outcome(&db.pool).await.0, 400);
    assert!(rate >= 68.0, "achieved {rate:.1}/s, wanted at least 68/s");
    assert!(
        share <= 0.01,
        "{limited} of {} answers were 429",
        stats.requests_total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_over_the_apis_limit_adapts_and_every_row_syncs() {
    let Limited {
        db,
        summary,
        stats,
        limited,
        share,
        ..
    } = against_a_limit_of_100("400").await;
    let (synced, failed, pending, max_attempts) = outcome(&db.pool).await;
    assert_eq!((synced, failed, pending), (400, 0, 0), "{summary:?}");
    assert_eq!(summary.failed, 0);
    // A 429 is not an attempt.
    assert_eq!(max_attempts, 1);
    assert!(
        share <= 0.25,
        "{limited} of {} answers were 429",
        stats.requests_total
    );
}

/// What an outage did: requests before it and during it, and the rows after the run.
struct Outage {
    before: u64,
    during: u64,
    total: u64,
    drained_in: Duration,
    /// Synced, failed, pending, the most attempts of one row.
    rows: (i64, i64, i64, i32),
}

/// Runs `rows` rows at 100/s through a 3 s outage (`fail_rate` 1.0) that begins `after` the
/// start of the run, and checks what the circuit must guarantee: at most 100 requests reach
/// the API during the outage, every row is synced after it, and rows held back by the open
/// circuit spend no attempt (only the few that met the outage do).
async fn outage(rows: i64, after: Duration) -> Outage {
    let faults = |fail_rate| Faults {
        fail_rate,
        ..Faults::default()
    };
    let first = if after.is_zero() { 1.0 } else { 0.0 };
    let (db, api) = start(rows, faults(first)).await;
    let s = settings(
        &db,
        &api,
        KEY,
        &[
            ("RATE_LIMIT__REQUESTS_PER_SECOND", "100"),
            ("SYNC__BACKOFF_BASE_MS", "200"),
        ],
    );
    let engine = common::engine_with(db.pool.clone(), &s, "outage");

    let started = Instant::now();
    let (summary, (before, during)) = tokio::join!(common::drain(&engine, RUN_LIMIT), async {
        tokio::time::sleep(after).await;
        let before = api.stats().requests_total;
        api.set_faults(faults(1.0)).expect("starting the outage");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = api.stats().requests_total - before;
        api.set_faults(faults(0.0)).expect("ending the outage");
        (before, during)
    });
    let o = Outage {
        before,
        during,
        total: api.stats().requests_total,
        drained_in: started.elapsed(),
        rows: outcome(&db.pool).await,
    };
    eprintln!(
        "3 s outage {:.0} s into a run of {rows} rows: {} requests before it, {} during it, {} in all; the most attempts one row spent: {}; drained in {:.1} s",
        after.as_secs_f64(),
        o.before,
        o.during,
        o.total,
        o.rows.3,
        o.drained_in.as_secs_f64()
    );
    assert!(
        o.during <= 100,
        "{} requests reached the API during the outage",
        o.during
    );
    assert_eq!((o.rows.0, o.rows.1, o.rows.2), (rows, 0, 0), "{summary:?}");
    assert!(o.rows.3 <= 4, "a row spent {} attempts", o.rows.3);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_circuit_and_rows_sync_after_it() {
    outage(300, Duration::ZERO).await;
}

/// The outage begins while rows stream out at full rate, with many rows queued for tokens:
/// those must wait at the gate again rather than go out into the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_in_mid_run_stops_the_rows_already_queued() {
    let o = outage(600, Duration::from_secs(1)).await;
    assert!(o.before > 0, "the run was under way");
}

/// `run --once` as a process against `base_url` with `key`; it must stop by itself.
async fn run_once_binary(db: &TestDb, base_url: &str, key: &str) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imprint-sync"))
            .args(["run", "--once"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .env("DATABASE_URL", &db.url)
            .env("IMPRINT_SYNC__API__BASE_URL", base_url)
            .env("IMPRINT_SYNC__API__KEY", key)
            .env("IMPRINT_SYNC__ADMIN__LISTEN", "127.0.0.1:0")
            .env("IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND", "100")
            .env("IMPRINT_SYNC__RATE_LIMIT__BURST", "20")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run --once stops by itself")
    .expect("running imprint-sync")
}

/// Every row is as it was seeded: pending, no attempt spent, no error.
async fn assert_untouched(pool: &PgPool) {
    let (changed, spent): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE sync_status <> 'pending' OR last_error_code IS NOT NULL),
                count(*) FILTER (WHERE attempts <> 0)
         FROM imprint_sync.customer_outbox",
    )
    .fetch_one(pool)
    .await
    .expect("reading the rows");
    assert_eq!(
        (changed, spent),
        (0, 0),
        "no row changes or spends an attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_changes_no_row_and_run_once_exits_2() {
    let (db, api) = start(100, Faults::default()).await;

    let out = run_once_binary(&db, api.base_url().as_str(), "not-the-key").await;

    let stderr = String::from_utf8_lossy(&out.stderr);
    let stats = api.stats();
    eprintln!(
        "wrong key: exit {:?}, {} requests reached the API ({} answered 401)",
        out.status.code(),
        stats.requests_total,
        stats.count(401)
    );
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("rejected") && stderr.contains("api.key"),
        "stderr says why:\n{stderr}"
    );
    assert!(
        stats.requests_total >= 1 && stats.requests_total <= 5,
        "{stats:?}"
    );
    assert_untouched(&db.pool).await;
}

/// Two replicas share 80/s. Each starts alone (its share is the whole rate until it counts the
/// other); a replica that joins announces itself on the workers channel and every replica
/// counts again at once, so the shares settle within a database round trip instead of a
/// heartbeat interval. The measurement therefore covers the whole run, start included; the
/// rate after the first 3 s (the steady state, whatever the announce does) is printed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_deployments_rate() {
    let (db, api) = start(600, Faults::default()).await;
    // Small batches, so the two replicas share the rows rather than one claiming them all.
    let s = settings(
        &db,
        &api,
        KEY,
        &[
            ("RATE_LIMIT__REQUESTS_PER_SECOND", "80"),
            ("SYNC__BATCH_SIZE", "20"),
        ],
    );
    let other_pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&db.url)
        .await
        .expect("a second pool");
    let a = common::engine_with(db.pool.clone(), &s, "replica-a");
    let b = common::engine_with(other_pool, &s, "replica-b");

    let ((sa, sb), samples) = measure(&api, async {
        tokio::join!(common::drain(&a, RUN_LIMIT), common::drain(&b, RUN_LIMIT))
    })
    .await;

    let rate = samples.rate();
    let steady = samples.rate_from(Duration::from_secs(3));
    eprintln!(
        "two replicas at 80/s in total: {rate:.1} requests/s over the run, {steady:.1}/s after the first 3 s, peak {} in one second; replica a synced {}, b {}",
        samples.peak_per_second(),
        sa.synced,
        sb.synced
    );
    assert_eq!(outcome(&db.pool).await.0, 600);
    assert_eq!(sa.synced + sb.synced, 600);
    assert!(sa.synced >= 100 && sb.synced >= 100, "both replicas worked");
    assert!(rate <= 88.0, "{rate:.1}/s in total, wanted at most 88/s");
    assert!(steady <= 88.0, "{steady:.1}/s in total after 3 s");
    // And they did not starve each other either.
    assert!(rate >= 60.0, "{rate:.1}/s in total");
}

/// A redirect means a wrong `api.base_url`: every row would fail the same way. Like a
/// rejected key, it pauses sending and changes no row; `run --once` exits 2 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_changes_no_row_and_run_once_exits_2() {
    use wiremock::matchers::any;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let db = TestDb::new().await;
    seed(&db.pool, 50).await;
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(302).insert_header("location", "https://elsewhere.example/v2/"),
        )
        .mount(&server)
        .await;

    let out = run_once_binary(&db, &server.uri(), KEY).await;

    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let requests = server.received_requests().await.unwrap().len();
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("api.base_url"),
        "stderr names the key:\n{stderr}"
    );
    assert!(
        stdout.contains("api.base_url"),
        "the summary names the key:\n{stdout}"
    );
    assert!((1..=5).contains(&requests), "{requests} requests");
    assert_untouched(&db.pool).await;
}

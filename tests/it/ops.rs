//! What operators see: the admin server (`/livez`, `/readyz`, `/metrics`) of a running
//! daemon, `imprint-sync status`, and `imprint-sync demo`. The built binary runs as a
//! process against real PostgreSQL; the sandbox runs in the test.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{
    API_KEY, Daemon, TestDb, admin_addr, admin_url, customer_id, env_with, eventually, insert,
    output_text, profile, row, run_binary, sandbox, test_env,
};
use imprint_sync::sandbox::Faults;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

// ---------------------------------------------------------------------------------------
// The admin server

/// Every metric the daemon documents, with its Prometheus type.
const METRICS: [(&str, &str); 12] = [
    ("imprint_sync_rows_total", "counter"),
    ("imprint_sync_claims_total", "counter"),
    ("imprint_sync_http_requests_total", "counter"),
    ("imprint_sync_http_request_duration_seconds", "histogram"),
    ("imprint_sync_outbox_pending", "gauge"),
    ("imprint_sync_outbox_failed", "gauge"),
    ("imprint_sync_outbox_oldest_pending_age_seconds", "gauge"),
    ("imprint_sync_sync_lag_seconds", "histogram"),
    ("imprint_sync_rate_limit_effective_rps", "gauge"),
    ("imprint_sync_circuit_open", "gauge"),
    ("imprint_sync_auth_paused", "gauge"),
    ("imprint_sync_replicas_live", "gauge"),
];

/// The documented label values of the two counters.
const ROW_OUTCOMES: [&str; 5] = ["synced", "failed", "superseded", "retried", "invalid"];
const HTTP_CLASSES: [&str; 7] = ["2xx", "3xx", "4xx", "5xx", "429", "timeout", "error"];

/// GET on the admin server: status and body.
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    match client.get(format!("http://{admin}{path}")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, format!("no answer: {e}")),
    }
}

/// Waits until `path` answers `status`; returns the body.
async fn wait_for(admin: SocketAddr, path: &str, status: u16, secs: u64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (got, body) = get(admin, path).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} did not answer {status} within {secs} s; last {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one series in Prometheus text, e.g. `imprint_sync_rows_total{outcome="synced"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `# TYPE` lines: metric name → type.
fn types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// What a metrics text lacks: documented names with the wrong or no type, and counter
/// series with a documented label value that are not there.
fn missing_metrics(text: &str) -> Vec<String> {
    let types = types(text);
    let mut missing: Vec<String> = METRICS
        .iter()
        .filter(|(name, kind)| types.get(*name).map(String::as_str) != Some(*kind))
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    let series = ROW_OUTCOMES
        .iter()
        .map(|o| format!("imprint_sync_rows_total{{outcome=\"{o}\"}}"))
        .chain(
            HTTP_CLASSES
                .iter()
                .map(|c| format!("imprint_sync_http_requests_total{{status=\"{c}\"}}")),
        );
    missing.extend(series.filter(|s| sample(text, s).is_none()));
    missing
}

async fn metrics(admin: SocketAddr) -> String {
    let (status, text) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text
}

/// Waits until the series has the value (gauges are refreshed every few seconds).
async fn wait_for_sample(admin: SocketAddr, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(admin).await;
        if sample(&text, series) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Any role that can connect may NOTIFY the outbox channel in a loop. With an empty outbox
/// each notification used to wake the claimer for another empty claim, back to back; now a
/// wake-up after an empty claim comes at most once per 50 ms, whatever the storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_storm_does_not_make_the_claimer_spin() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let env = env_with(
        &db.url,
        &sandbox.base_url(),
        &[("SYNC__POLL_INTERVAL_MS", "1000")],
    );
    let mut daemon = Daemon::start(&["run"], &env);
    let admin = admin_addr(&daemon).await;
    let claims = async || sample(&metrics(admin).await, "imprint_sync_claims_total").unwrap_or(0.0);
    eventually(30, "the daemon claims", || async { claims().await > 0.0 }).await;

    let mut storm = PgConnection::connect(&db.url).await.expect("connecting");
    let before = claims().await;
    let started = std::time::Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(2) {
        sqlx::raw_sql("NOTIFY imprint_sync_outbox")
            .execute(&mut storm)
            .await
            .expect("NOTIFY");
        sent += 1;
    }
    let claimed = claims().await - before;
    let elapsed_ms = started.elapsed().as_millis() as f64;

    // One wake-up per 50 ms, one poll per second, and a few for the edges.
    let bound = elapsed_ms / 50.0 + elapsed_ms / 1000.0 + 10.0;
    assert!(
        claimed <= bound,
        "{claimed} claims for {sent} NOTIFYs in {elapsed_ms} ms (at most {bound})"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
}

/// A running daemon answers /livez and /readyz, and /metrics carries every documented metric
/// with its type and every documented counter label from the start, then counts what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_is_live_ready_and_exports_every_metric() {
    let db = TestDb::new().await;
    let unknown = customer_id(61, 404);
    let sandbox = sandbox(Faults {
        not_found: [unknown.clone()].into(),
        ..Faults::default()
    })
    .await;
    let mut daemon = Daemon::start(&["run"], &test_env(&db.url, &sandbox.base_url()));
    let admin = admin_addr(&daemon).await;

    let live = wait_for(admin, "/livez", 200, 30).await;
    assert_eq!(
        serde_json::from_str::<Value>(&live).unwrap()["status"],
        "live"
    );
    let ready = wait_for(admin, "/readyz", 200, 30).await;
    assert_eq!(
        serde_json::from_str::<Value>(&ready).unwrap()["status"],
        "ready"
    );

    // A fresh daemon: nothing sent yet, yet every series a dashboard or alert refers to is
    // there (an absent series makes `increase(...)` and `== 1` alerts silently empty).
    wait_for_sample(admin, "imprint_sync_replicas_live", 1.0).await;
    let fresh = metrics(admin).await;
    assert_eq!(missing_metrics(&fresh), Vec::<String>::new(), "{fresh}");
    assert_eq!(
        sample(&fresh, "imprint_sync_rows_total{outcome=\"synced\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&fresh, "imprint_sync_auth_paused"), Some(0.0));
    assert_eq!(sample(&fresh, "imprint_sync_circuit_open"), Some(0.0));

    // One row syncs, one fails (404).
    let ids = insert(
        &db.pool,
        &[profile(&customer_id(61, 1), 1), profile(&unknown, 1)],
    )
    .await;
    eventually(30, "both rows are finished", || async {
        let (a, b) = (row(&db.pool, ids[0]).await, row(&db.pool, ids[1]).await);
        a.sync_status == "synced" && b.sync_status == "failed"
    })
    .await;

    wait_for_sample(admin, "imprint_sync_outbox_failed", 1.0).await;
    wait_for_sample(admin, "imprint_sync_outbox_pending", 0.0).await;
    let text = metrics(admin).await;
    let expect = [
        ("imprint_sync_rows_total{outcome=\"synced\"}", 1.0),
        ("imprint_sync_rows_total{outcome=\"failed\"}", 1.0),
        ("imprint_sync_rows_total{outcome=\"retried\"}", 0.0),
        ("imprint_sync_http_requests_total{status=\"2xx\"}", 1.0),
        ("imprint_sync_http_requests_total{status=\"4xx\"}", 1.0),
        ("imprint_sync_http_requests_total{status=\"5xx\"}", 0.0),
        ("imprint_sync_http_request_duration_seconds_count", 2.0),
        ("imprint_sync_sync_lag_seconds_count", 1.0),
        ("imprint_sync_outbox_oldest_pending_age_seconds", 0.0),
        ("imprint_sync_replicas_live", 1.0),
        ("imprint_sync_auth_paused", 0.0),
        ("imprint_sync_circuit_open", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series}:\n{text}");
    }
    let rps = sample(&text, "imprint_sync_rate_limit_effective_rps").unwrap_or(0.0);
    assert!(rps > 0.0, "effective rate {rps}:\n{text}");
    assert_eq!(missing_metrics(&text), Vec::<String>::new(), "{text}");

    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
}

/// A rejected key: /readyz is 503 and says to check api.key, the row is left as it was, the
/// log says why (without the key), and the auth gauge is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_and_names_the_key_when_the_api_rejects_it() {
    const WRONG_KEY: &str = "sk_test_WRONGkeyCANARY77";
    assert_ne!(WRONG_KEY, API_KEY);
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let id = insert(&db.pool, &[profile(&customer_id(62, 1), 1)]).await[0];
    let env = env_with(&db.url, &sandbox.base_url(), &[("API__KEY", WRONG_KEY)]);
    let mut daemon = Daemon::start(&["run"], &env);
    let admin = admin_addr(&daemon).await;

    eventually(30, "the sandbox answers 401", || {
        std::future::ready(sandbox.stats().count(401) >= 1)
    })
    .await;
    let body = wait_for(admin, "/readyz", 503, 15).await;
    let v: Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    assert_eq!(v["status"], "not_ready", "{body}");
    let reasons = v["reasons"].as_array().expect("reasons is a list");
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("api.key"))),
        "{body}"
    );
    // Not a liveness problem: restarting would not fix a key.
    assert_eq!(get(admin, "/livez").await.0, 200);
    wait_for_sample(admin, "imprint_sync_auth_paused", 1.0).await;

    let r = row(&db.pool, id).await;
    assert_eq!(
        (r.sync_status.as_str(), r.attempts),
        ("pending", 0),
        "{r:?}"
    );
    assert_eq!(sandbox.stats().count(200), 0);

    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
    let stderr = daemon.stderr();
    let error_line = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["level"] == "ERROR" && v["message"].as_str().is_some_and(|m| m.contains("api.key"))
        });
    assert!(
        error_line.is_some(),
        "no error line naming api.key:\n{stderr}"
    );
    assert!(
        !stderr.contains(WRONG_KEY),
        "the key is in the log:\n{stderr}"
    );
}

/// The database stops answering: /readyz is 503 and says so while /livez stays 200 (a
/// restart would not help); once it is back, /readyz is 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_database_does_not_answer() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let mut daemon = Daemon::start(&["run"], &test_env(&db.url, &sandbox.base_url()));
    let admin = admin_addr(&daemon).await;
    wait_for(admin, "/readyz", 200, 30).await;

    db.set_available(false).await;
    let body = wait_for(admin, "/readyz", 503, 30).await;
    let live = get(admin, "/livez").await;
    db.set_available(true).await;

    let v: Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    assert_eq!(v["status"], "not_ready", "{body}");
    assert!(
        v["reasons"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("database")))),
        "{body}"
    );
    assert_eq!(live.0, 200, "{}", live.1);
    wait_for(admin, "/readyz", 200, 30).await;

    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
}

// ---------------------------------------------------------------------------------------
// imprint-sync status

const STATES: [&str; 5] = ["pending", "in_flight", "synced", "failed", "superseded"];

fn status(db: &TestDb, json: bool) -> String {
    let args: &[&str] = if json {
        &["status", "--json"]
    } else {
        &["status"]
    };
    let out = run_binary(args, &[("DATABASE_URL", &db.url)]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn status_json(db: &TestDb) -> Value {
    let text = status(db, true);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let keys: BTreeSet<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "counts",
            "oldest_pending_age_seconds",
            "failed_by_error_code",
            "last_synced_at",
            "replicas",
            "reconcile"
        ]),
        "{text}"
    );
    let counts: BTreeSet<&str> = v["counts"]
        .as_object()
        .expect("counts")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(counts, BTreeSet::from(STATES), "{text}");
    v
}

/// Rows in every state, two error codes among the failed, a synced customer, a live and a
/// dead worker.
async fn seed_every_state(db: &TestDb) {
    sqlx::raw_sql(
        "INSERT INTO imprint_sync.customer_outbox
             (id, customer_id, email, sync_status, enqueued_at, attempts, lease_expires_at,
              leased_by, last_error_code, superseded_by, synced_at)
         OVERRIDING SYSTEM VALUE VALUES
           (1, 'C-PENDING-1', 'p1@example.com', 'pending', now() - interval '120 s', 0, NULL, NULL, NULL, NULL, NULL),
           (2, 'C-PENDING-2', 'p2@example.com', 'pending', now() - interval '10 s', 2, NULL, NULL, NULL, NULL, NULL),
           (3, 'C-FLIGHT', 'f@example.com', 'in_flight', now() - interval '20 s', 1, now() + interval '60 s', 'w-live', NULL, NULL, NULL),
           (4, 'C-SYNCED', 's@example.com', 'synced', now() - interval '40 s', 1, NULL, NULL, NULL, NULL, now() - interval '30 s'),
           (5, 'C-FAILED-1', 'x1@example.com', 'failed', now(), 1, NULL, NULL, 'CUSTOMER_NOT_FOUND_ERROR', NULL, NULL),
           (6, 'C-FAILED-2', 'x2@example.com', 'failed', now(), 1, NULL, NULL, 'CUSTOMER_NOT_FOUND_ERROR', NULL, NULL),
           (7, 'C-FAILED-3', 'x3@example.com', 'failed', now(), 0, NULL, NULL, 'invalid_profile', NULL, NULL),
           (8, 'C-SYNCED', 's0@example.com', 'superseded', now() - interval '50 s', 0, NULL, NULL, NULL, 4, NULL);
         INSERT INTO imprint_sync.customer_sync_state (customer_id, last_synced_outbox_id, last_synced_at)
         VALUES ('C-SYNCED', 4, '2024-05-01T12:00:00Z');
         INSERT INTO imprint_sync.workers (worker_id, hostname, version, heartbeat_at) VALUES
           ('w-live', 'host-a', '0.1.0', now()),
           ('w-dead', 'host-b', '0.1.0', now() - interval '10 minutes');",
    )
    .execute(&db.pool)
    .await
    .expect("seeding every state");
}

/// `status --json`: exactly the documented keys, the counts by state, failures by error
/// code, the oldest pending row's age, the last sync, and only the live replica.
#[tokio::test]
async fn status_json_counts_every_state() {
    let db = TestDb::new().await;
    seed_every_state(&db).await;
    let v = status_json(&db);

    let counts: BTreeMap<String, i64> = serde_json::from_value(v["counts"].clone()).unwrap();
    let want = [
        ("pending", 2),
        ("in_flight", 1),
        ("synced", 1),
        ("failed", 3),
        ("superseded", 1),
    ];
    assert_eq!(counts, want.map(|(k, n)| (k.to_owned(), n)).into(), "{v:#}");
    let failed: BTreeMap<String, i64> =
        serde_json::from_value(v["failed_by_error_code"].clone()).unwrap();
    assert_eq!(
        failed,
        BTreeMap::from([
            ("CUSTOMER_NOT_FOUND_ERROR".to_owned(), 2),
            ("invalid_profile".to_owned(), 1)
        ]),
        "{v:#}"
    );
    // The oldest pending row was enqueued 120 s before the seed, not the newer one (10 s).
    let age = v["oldest_pending_age_seconds"].as_f64().expect("a number");
    assert!((120.0..3600.0).contains(&age), "{age}");
    let last: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(v["last_synced_at"].clone()).expect("a time");
    assert_eq!(last.to_rfc3339(), "2024-05-01T12:00:00+00:00");
    let replicas = v["replicas"].as_array().expect("a list");
    assert_eq!(replicas.len(), 1, "{v:#}");
    assert_eq!(replicas[0]["worker_id"], "w-live");
    assert_eq!(replicas[0]["hostname"], "host-a");
}

/// The plain form is an aligned table with the same numbers.
#[tokio::test]
async fn status_table_is_aligned_and_shows_the_counts() {
    let db = TestDb::new().await;
    seed_every_state(&db).await;
    let text = status(&db, false);
    let rows = [
        ("pending", "2"),
        ("in_flight", "1"),
        ("synced", "1"),
        ("failed", "3"),
        ("superseded", "1"),
        ("live replicas", "1"),
        ("  CUSTOMER_NOT_FOUND_ERROR", "2"),
        ("  invalid_profile", "1"),
        ("last synced at", "2024-05-01T12:00:00+00:00"),
    ];
    let mut columns = BTreeSet::new();
    for (label, value) in rows {
        let line = text
            .lines()
            .find(|l| l.strip_prefix(label).is_some_and(|r| r.starts_with("  ")))
            .unwrap_or_else(|| panic!("no line for {label:?}:\n{text}"));
        let column = line.len() - line[label.len()..].trim_start().len();
        assert_eq!(line[column..].trim_end(), value, "{label}:\n{text}");
        columns.insert(column);
    }
    let age = text
        .lines()
        .find(|l| l.starts_with("oldest pending age"))
        .unwrap_or_else(|| panic!("no oldest pending age:\n{text}"));
    assert!(age.trim_end().ends_with(" s"), "{age}");
    assert_eq!(
        columns.len(),
        1,
        "values start in different columns:\n{text}"
    );
}

/// On an empty outbox: zeros, nulls and empty lists; the table says so with dashes.
#[tokio::test]
async fn status_of_an_empty_outbox() {
    let db = TestDb::new().await;
    let v = status_json(&db);
    for s in STATES {
        assert_eq!(v["counts"][s], 0, "{s}: {v:#}");
    }
    assert!(v["oldest_pending_age_seconds"].is_null(), "{v:#}");
    assert!(v["last_synced_at"].is_null(), "{v:#}");
    assert_eq!(v["failed_by_error_code"], serde_json::json!({}));
    assert_eq!(v["replicas"], serde_json::json!([]));

    let text = status(&db, false);
    for label in [
        "oldest pending age",
        "last synced at",
        "failed by error code",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label}:\n{text}"));
        assert_eq!(line[label.len()..].trim(), "-", "{text}");
    }
}

// ---------------------------------------------------------------------------------------
// imprint-sync demo

struct DemoRun {
    code: Option<i32>,
    stdout: String,
    all: String,
    database: String,
}

fn demo(server: &str, extra: &[&str]) -> DemoRun {
    let args: Vec<&str> = ["demo", "--rows", "300"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let out = run_binary(&args, &[("DATABASE_URL", server)]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = output_text(&out);
    let database = stdout
        .split_whitespace()
        .find(|w| w.starts_with("imprint_sync_demo_"))
        .unwrap_or_else(|| panic!("the demo names no database:\n{all}"))
        .to_owned();
    DemoRun {
        code: out.status.code(),
        stdout,
        all,
        database,
    }
}

async fn database_exists(server: &str, name: &str) -> bool {
    let mut conn = server_connection(server).await;
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("reading pg_database")
}

async fn server_connection(url: &str) -> PgConnection {
    PgConnection::connect_with(&imprint_sync::db::connect_options(url).expect("url"))
        .await
        .expect("connecting")
}

/// The summary lines, from "rows seeded" to "elapsed".
fn summary(stdout: &str) -> Vec<&str> {
    let lines: Vec<&str> = stdout.lines().collect();
    let from = lines
        .iter()
        .position(|l| l.trim_start().starts_with("rows seeded"));
    let to = lines
        .iter()
        .position(|l| l.trim_start().starts_with("elapsed"));
    match (from, to) {
        (Some(from), Some(to)) if from < to => lines[from..=to].to_vec(),
        _ => panic!("no summary table:\n{stdout}"),
    }
}

/// The number on the summary line that starts with `label`.
fn summary_number(stdout: &str, label: &str) -> f64 {
    summary(stdout)
        .iter()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no summary number {label:?}:\n{stdout}"))
}

fn assert_green(run: &DemoRun) {
    assert_eq!(run.code, Some(0), "{}", run.all);
    // The seed has older versions (superseded), invalid rows and an unknown customer
    // (failed).
    for label in ["synced", "superseded", "failed", "rows/s"] {
        let n = summary_number(&run.stdout, label);
        assert!(n > 0.0, "{label} is {n}:\n{}", run.stdout);
    }
    // The numbers add up on their face: every seeded row is synced, superseded or failed,
    // and the rows invalid on purpose are the superseded invalid ones plus invalid_profile.
    let seeded = summary_number(&run.stdout, "rows seeded");
    let finished = ["synced", "superseded", "failed"]
        .map(|l| summary_number(&run.stdout, l))
        .iter()
        .sum::<f64>();
    assert_eq!(finished, seeded, "{}", run.stdout);
    assert_eq!(
        summary_number(&run.stdout, "synced + superseded + failed"),
        seeded
    );
    let invalid: f64 = run
        .stdout
        .split("carry an invalid field")
        .next()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no invalid count:\n{}", run.stdout));
    assert_eq!(
        summary_number(&run.stdout, "of them invalid on purpose")
            + summary_number(&run.stdout, "invalid_profile"),
        invalid,
        "{}",
        run.stdout
    );
    // The invalid rows are counted, not logged one by one over the progress bar.
    assert!(
        !run.all.contains("WARN"),
        "per-row logs on screen:\n{}",
        run.all
    );
    // A table: the numbers end in one column.
    let ends: BTreeSet<usize> = summary(&run.stdout)
        .iter()
        .map(|l| l.trim_end().len())
        .collect();
    assert_eq!(ends.len(), 1, "summary not aligned:\n{}", run.stdout);
    assert!(run.stdout.contains("customer_sync_state"), "{}", run.stdout);
    assert_eq!(
        run.stdout.matches("last_synced_outbox_id=").count(),
        3,
        "{}",
        run.stdout
    );
    // G8: the seeded emails (and the deliberately invalid one) never reach the output.
    for personal in ["@example.com", "not-an-email"] {
        assert!(
            !run.all.contains(personal),
            "{personal} in the output:\n{}",
            run.all
        );
    }
}

/// `demo` on a bare server: green, a summary, three rows of state, and its database gone.
#[tokio::test]
async fn demo_runs_green_and_drops_its_database() {
    let server = admin_url().await;
    let run = demo(&server, &[]);
    let left = database_exists(&server, &run.database).await;
    assert_green(&run);
    assert!(!left, "{} was left behind:\n{}", run.database, run.all);
}

/// `demo --keep` keeps the drained database.
#[tokio::test]
async fn demo_keep_keeps_the_drained_database() {
    let server = admin_url().await;
    let run = demo(&server, &["--keep"]);
    let kept = database_exists(&server, &run.database).await;
    let unfinished = if kept {
        let mut url = url::Url::parse(&server).expect("server url");
        url.set_path(&run.database);
        let mut conn = server_connection(url.as_str()).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imprint_sync.customer_outbox
             WHERE sync_status IN ('pending', 'in_flight')",
        )
        .fetch_one(&mut conn)
        .await
        .expect("counting unfinished rows");
        drop(conn);
        let mut admin = server_connection(&server).await;
        let drop_it = format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, run.database);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop_it))
            .execute(&mut admin)
            .await
            .expect("dropping the kept demo database");
        Some(n)
    } else {
        None
    };
    assert_green(&run);
    assert_eq!(unfinished, Some(0), "kept {}: {}", run.database, run.all);
}

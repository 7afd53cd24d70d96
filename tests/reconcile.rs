//! Reconciliation against the real PostgreSQL and the sandbox over TCP: `imprint-sync
//! reconcile` (the built binary), the sweep inside `run`, and the sandbox's drift injection.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{
    API_KEY, Daemon, TestDb, customer_id, env_with, eventually, insert, output_text, profile,
    run_binary, run_once, sandbox, seed_customers,
};
use imprint_sync::sandbox::{Faults, SandboxHandle};
use serde_json::{Value, json};
use sqlx::PgPool;

/// A fresh database and sandbox with `n` customers of `group` synced.
async fn start(group: u32, n: u32) -> (TestDb, SandboxHandle, Vec<String>) {
    let db = TestDb::new().await;
    let api = sandbox(Faults::default()).await;
    let ids = synced(&db, &api, group, n).await;
    (db, api, ids)
}

/// `n` customers of `group`, synced through the engine (so `accepted` holds their profile).
async fn synced(db: &TestDb, api: &SandboxHandle, group: u32, n: u32) -> Vec<String> {
    seed_customers(&db.pool, group, n).await;
    let summary = run_once(db, &api.base_url(), &[]).await;
    assert_eq!(summary.synced, u64::from(n), "{summary:?}");
    (0..n).map(|i| customer_id(group, i)).collect()
}

/// A change "at Imprint", through the sandbox's admin API.
async fn patch(api: &SandboxHandle, id: &str, fields: Value) {
    let r = reqwest::Client::new()
        .patch(format!("{}_sandbox/customers/{id}", api.base_url()))
        .json(&fields)
        .send()
        .await
        .expect("PATCH /_sandbox/customers");
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
}

async fn delete(api: &SandboxHandle, id: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!("{}_sandbox/customers/{id}", api.base_url()))
        .send()
        .await
        .expect("DELETE /_sandbox/customers")
        .status()
        .as_u16()
}

/// A finished `reconcile` run: its exit code, its JSON report, and all it printed.
struct Pass {
    code: i32,
    report: Value,
    text: String,
}

impl Pass {
    /// The customers listed with `result`, and their fields.
    fn listed(&self, result: &str) -> BTreeMap<String, Vec<String>> {
        self.report["customers"]
            .as_array()
            .expect("customers")
            .iter()
            .filter(|c| c["result"] == result)
            .map(|c| {
                let fields = c["fields"]
                    .as_array()
                    .map(|f| f.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                (c["customer_id"].as_str().unwrap().to_owned(), fields)
            })
            .collect()
    }
}

/// Runs `imprint-sync reconcile --json ARGS` against `api`.
fn reconcile(db: &TestDb, api: &SandboxHandle, args: &[&str], overrides: &[(&str, &str)]) -> Pass {
    let env = env_with(&db.url, &api.base_url(), overrides);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut argv = vec!["reconcile", "--json"];
    argv.extend_from_slice(args);
    let out = run_binary(&argv, &env);
    let text = output_text(&out);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Pass {
        code: out.status.code().expect("exit code"),
        report,
        text,
    }
}

/// `customer_sync_state` as reconciliation left it: result, drift, verified.
async fn findings(pool: &PgPool) -> BTreeMap<String, (Option<String>, Option<Value>, bool)> {
    sqlx::query_as::<_, (String, Option<String>, Option<Value>, bool)>(
        "SELECT customer_id, reconcile_result, drift, verified_at IS NOT NULL
         FROM imprint_sync.customer_sync_state",
    )
    .fetch_all(pool)
    .await
    .expect("reading customer_sync_state")
    .into_iter()
    .map(|(id, r, d, v)| (id, (r, d, v)))
    .collect()
}

/// What the drift injected on customer `n` changes at Imprint, and the fields it drifts.
fn drift_for(n: usize) -> (Value, Vec<&'static str>) {
    match n % 8 {
        0 => (json!({"email": "someone.else@example.org"}), vec!["email"]),
        1 => (json!({"phone": "+14155550199"}), vec!["phone"]),
        2 => (json!({"address": {"city": "Shelbyville"}}), vec!["city"]),
        3 => (
            json!({"last_name": "Byron", "address": {"postal_code": "10001"}}),
            vec!["last_name", "postal_code"],
        ),
        4 => (json!({"address": {"country": "CAN"}}), vec!["country"]),
        5 => (json!({"metadata": {"version": 99}}), vec!["metadata"]),
        6 => (
            json!({"first_name": "Augusta", "preferred_language": "fr"}),
            vec!["first_name", "preferred_language"],
        ),
        _ => (
            json!({"address": {"street_line1": "2 Side St", "state": null}}),
            vec!["street_line1", "state"],
        ),
    }
}

/// Values that must never appear in output or logs: the seeded profile's and the drift's.
const PERSONAL: [&str; 12] = [
    "@example.com",
    "@example.org",
    "+14155550100",
    "+14155550199",
    "Ada",
    "Lovelace",
    "Byron",
    "Augusta",
    "1 Main St",
    "2 Side St",
    "Springfield",
    "Shelbyville",
];

fn assert_no_personal_values(text: &str) {
    for v in PERSONAL {
        assert!(
            !text.contains(v),
            "a personal value ({v}) was printed:\n{text}"
        );
    }
}

/// The acceptance run: 200 synced, drift on 20 (various fields), 5 deleted at Imprint.
/// `reconcile` finds exactly those, `--repair` enqueues the partner's profile, the engine
/// resends it, and the next `reconcile` finds only the 5 missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_and_deletions_are_found_repaired_and_reported() {
    let (db, api, ids) = start(12, 200).await;
    let mut want_drift = BTreeMap::new();
    for (n, id) in ids.iter().take(20).enumerate() {
        let (change, fields) = drift_for(n);
        patch(&api, id, change).await;
        want_drift.insert(id.clone(), fields.iter().map(|f| f.to_string()).collect());
    }
    let deleted: BTreeSet<String> = ids[20..25].iter().cloned().collect();
    for id in &deleted {
        assert_eq!(delete(&api, id).await, 204);
    }
    // A card closed at Imprint is not drift, but shows on the partner side.
    patch(
        &api,
        &ids[30],
        json!({"statuses": {"Imprint Card": "CLOSED"}}),
    )
    .await;
    assert_eq!(api.stats().drift_injected, 26);

    let first = reconcile(&db, &api, &[], &[]);
    assert_eq!(first.code, 1, "{}", first.text);
    let r = &first.report;
    assert_eq!(
        (
            r["checked"].as_i64(),
            r["in_step"].as_i64(),
            r["drifted"].as_i64()
        ),
        (Some(200), Some(175), Some(20)),
        "{r}"
    );
    assert_eq!(
        (
            r["missing"].as_i64(),
            r["errors"].as_i64(),
            r["repaired"].as_i64()
        ),
        (Some(5), Some(0), Some(0))
    );
    assert_eq!(first.listed("drifted"), want_drift);
    assert_eq!(
        first.listed("missing").into_keys().collect::<BTreeSet<_>>(),
        deleted
    );
    assert_no_personal_values(&first.text);

    // What it found is in the database, field names only.
    let found = findings(&db.pool).await;
    for (id, fields) in &want_drift {
        let (result, drift, verified) = &found[id];
        assert_eq!(result.as_deref(), Some("drifted"), "{id}");
        assert_eq!(drift.as_ref(), Some(&json!(fields)), "{id}");
        assert!(verified);
    }
    for id in &deleted {
        assert_eq!(found[id].0.as_deref(), Some("missing"), "{id}");
    }
    assert_eq!(found[&ids[30]].0.as_deref(), Some("in_step"));
    let statuses: Value = common::sync_state(&db.pool, &ids[30], "statuses").await;
    assert_eq!(statuses, json!({"Imprint Card": "CLOSED"}));
    let missing_now: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_sync_state WHERE reconcile_result = 'missing'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(missing_now, 5);

    // --repair: one outbox row per drifted customer, nothing sent by reconcile itself.
    let posts_before = api.stats().requests_total - api.stats().reads;
    let repair = reconcile(&db, &api, &["--repair"], &[]);
    assert_eq!(repair.code, 1, "{}", repair.text);
    assert_eq!(
        repair.report["repaired"].as_i64(),
        Some(20),
        "{}",
        repair.report
    );
    assert_eq!(api.stats().requests_total - api.stats().reads, posts_before);
    let pending: Vec<String> = sqlx::query_scalar(
        "SELECT customer_id FROM imprint_sync.customer_outbox WHERE sync_status = 'pending'
         ORDER BY customer_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, want_drift.keys().cloned().collect::<Vec<_>>());

    let summary = run_once(&db, &api.base_url(), &[]).await;
    assert_eq!(summary.synced, 20, "{summary:?}");
    // The resent profile is the partner's newest one (version 1 of the seed).
    let sent = api.journal(&ids[5]);
    assert_eq!(sent.last().unwrap()["metadata"], json!({"version": 1}));

    let last = reconcile(&db, &api, &[], &[]);
    assert_eq!(last.code, 1, "{}", last.text);
    assert_eq!(last.report["drifted"].as_i64(), Some(0), "{}", last.report);
    assert_eq!(last.report["missing"].as_i64(), Some(5));
    assert_eq!(
        last.listed("missing").into_keys().collect::<BTreeSet<_>>(),
        deleted
    );
    assert_no_personal_values(&last.text);

    // `status` shows it.
    let env = env_with(&db.url, &api.base_url(), &[]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_binary(&["status", "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rec = &status["reconcile"];
    assert_eq!(rec["drifted_now"], 0, "{status}");
    assert_eq!(rec["missing_now"], 5);
    assert_eq!(rec["verified_in_period"], 200);
    assert_eq!(rec["last_pass"]["checked"], 200);
    assert_eq!(rec["last_pass"]["missing"], 5);
    let table = output_text(&run_binary(&["status"], &env));
    assert!(table.contains("missing now"), "{table}");
}

/// The comparison uses the newest value Imprint accepted per field: a NULL field of the newest
/// row is not compared, and an older row's e-mail still counts after a newer row changed only
/// the phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_fields_are_not_compared_and_older_fields_still_count() {
    let db = TestDb::new().await;
    let api = sandbox(Faults::default()).await;
    let id = customer_id(13, 1);
    insert(
        &db.pool,
        &[json!({"customer_id": id, "email": "ada@example.com"})],
    )
    .await;
    run_once(&db, &api.base_url(), &[]).await;
    insert(
        &db.pool,
        &[json!({"customer_id": id, "phone": "+14155550100"})],
    )
    .await;
    run_once(&db, &api.base_url(), &[]).await;
    // Imprint holds values for fields the partner never set.
    patch(
        &api,
        &id,
        json!({"first_name": "Ada", "address": {"city": "Springfield"}, "metadata": {"x": 1}}),
    )
    .await;
    let pass = reconcile(&db, &api, &["--customer", &id], &[]);
    assert_eq!(pass.code, 0, "{}", pass.text);
    assert_eq!(pass.report["in_step"], 1, "{}", pass.report);

    // The older row's e-mail is still the partner's: changed at Imprint, it is drift.
    patch(&api, &id, json!({"email": "other@example.org"})).await;
    let pass = reconcile(&db, &api, &["--customer", &id], &[]);
    assert_eq!(pass.code, 1, "{}", pass.text);
    assert_eq!(pass.listed("drifted")[&id], ["email"]);
}

/// An e-mail that differs only in case, or the same phone number written another way, is not
/// drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_and_phone_format_are_not_drift() {
    let (db, api, ids) = start(14, 2).await;
    let email = profile(&ids[0], 1)["email"]
        .as_str()
        .unwrap()
        .to_uppercase();
    patch(&api, &ids[0], json!({"email": email})).await;
    patch(&api, &ids[1], json!({"phone": "+1 (415) 555-0100"})).await;
    let pass = reconcile(&db, &api, &[], &[]);
    assert_eq!(pass.code, 0, "{}", pass.text);
    assert_eq!(pass.report["in_step"], 2, "{}", pass.report);
    assert_eq!(pass.report["customers"], json!([]));
}

/// A rejected key: exit 2 after one request (the gate lets a single probe through until the
/// key is known to work), and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_exits_2_and_writes_nothing() {
    let (db, api, _) = start(15, 30).await;
    api.reset();
    let pass = reconcile(&db, &api, &[], &[("API__KEY", "sk_test_wrong")]);
    assert_eq!(pass.code, 2, "{}", pass.text);
    assert!(pass.text.contains("rejected"), "{}", pass.text);
    assert!(!pass.text.contains("sk_test_wrong"), "{}", pass.text);
    assert!(!pass.text.contains(API_KEY));
    assert_eq!(api.stats().count(401), 1, "{:?}", api.stats());
    let touched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_sync_state
         WHERE checked_at IS NOT NULL OR verified_at IS NOT NULL OR reconcile_result IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(touched, 0);
}

/// A 500 from GET is retried, then counted as `error`: never drift, and the customer's last
/// finding is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_read_is_retried_then_an_error_not_drift() {
    let (db, api, ids) = start(16, 2).await;
    patch(&api, &ids[0], json!({"address": {"city": "Shelbyville"}})).await;
    api.set_faults(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .unwrap();
    api.reset();
    let pass = reconcile(&db, &api, &["--customer", &ids[0]], &[]);
    assert_eq!(pass.code, 0, "errors are not drift: {}", pass.text);
    assert_eq!(pass.report["errors"], 1, "{}", pass.report);
    assert_eq!(pass.report["drifted"], 0);
    assert_eq!(pass.report["customers"][0]["error"], "API_ERROR");
    assert_eq!(
        api.stats().count(500),
        3,
        "read three times: {:?}",
        api.stats()
    );
    assert_eq!(findings(&db.pool).await[&ids[0]].0, None);
}

/// Bad arguments and configuration exit 64 and name what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_configuration_exit_64() {
    let db = TestDb::new().await;
    let api = sandbox(Faults::default()).await;
    for (args, overrides, names) in [
        (&["--customer", "not/an id"][..], &[][..], "--customer"),
        (&["--since", "yesterday"][..], &[][..], "--since"),
        (
            &[][..],
            &[("RECONCILE__MAX_SHARE", "1.5")][..],
            "reconcile.max_share",
        ),
        (
            &[][..],
            &[("RECONCILE__PERIOD_HOURS", "0")][..],
            "reconcile.period_hours",
        ),
        (
            &[][..],
            &[("RECONCILE__INTERVAL_MS", "86400000")][..],
            "reconcile.interval_ms",
        ),
    ] {
        let pass = reconcile(&db, &api, args, overrides);
        assert_eq!(pass.code, 64, "{args:?} {overrides:?}: {}", pass.text);
        assert!(pass.text.contains(names), "{}", pass.text);
    }
}

/// The sandbox drifts on request: PATCH overwrites the copy (address and statuses key by
/// key), DELETE removes the customer so that GET and POST answer 404; both are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_drifts_on_request() {
    let (_db, api, ids) = start(17, 2).await;
    patch(
        &api,
        &ids[0],
        json!({"phone": "+1 415 555 0199", "address": {"city": "Shelbyville"}}),
    )
    .await;
    let c = api.customer(&ids[0]).unwrap();
    assert_eq!(c["phone"], "+1 415 555 0199");
    assert_eq!(c["address"]["city"], "Shelbyville");
    assert_eq!(c["address"]["state"], "IL", "other address fields stay");
    assert_eq!(c["first_name"], "Ada");

    let http = reqwest::Client::new();
    let url = |id: &str| format!("{}_sandbox/customers/{id}", api.base_url());
    let status = |r: reqwest::Response| r.status().as_u16();
    let r = http
        .patch(url(&ids[0]))
        .json(&json!({"id": "X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 400);
    let r = http
        .patch(url("UNKNOWN-1"))
        .json(&json!({"email": "a@b.co"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 404);

    assert_eq!(delete(&api, &ids[1]).await, 204);
    assert_eq!(delete(&api, &ids[1]).await, 404);
    let v2 = format!("{}v2/customers/{}", api.base_url(), ids[1]);
    let get = http.get(&v2).bearer_auth(API_KEY).send().await.unwrap();
    assert_eq!(status(get), 404);
    let post = http
        .post(&v2)
        .bearer_auth(API_KEY)
        .json(&json!({"first_name": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(post), 404);
    assert_eq!(api.stats().drift_injected, 2);
}

/// The daemon (`run`) with the sweep configured by `overrides`.
fn run_sweep(db: &TestDb, api: &SandboxHandle, overrides: &[(&str, &str)]) -> Daemon {
    Daemon::start(&["run"], &env_with(&db.url, &api.base_url(), overrides))
}

/// SIGTERM, and a clean exit; returns what the daemon logged.
async fn stop(mut daemon: Daemon) -> String {
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
    daemon.stderr()
}

/// `verified_at` of every customer, as seconds since the epoch (database clock).
async fn verified(pool: &PgPool) -> BTreeMap<String, Option<f64>> {
    sqlx::query_as::<_, (String, Option<f64>)>(
        "SELECT customer_id, extract(epoch FROM verified_at)::float8
         FROM imprint_sync.customer_sync_state",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// A free port on 127.0.0.1 for the admin server.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sweep checks every customer once within its period (the sandbox counts the reads),
/// and the metrics count what it found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_checks_every_customer_once_per_period() {
    let (db, api, _) = start(18, 60).await;
    api.reset();
    let admin = format!("127.0.0.1:{}", free_port());
    // A 6 s period at 10 ticks a second: one customer per tick.
    let period_s = 6.0;
    let hours = (period_s / 3_600.0).to_string();
    let overrides = &[
        ("RECONCILE__INTERVAL_MS", "100"),
        ("RECONCILE__PERIOD_HOURS", &hours),
        ("ADMIN__LISTEN", &admin),
    ];
    let daemon = run_sweep(&db, &api, overrides);
    eventually(60, "every customer is verified", || async {
        verified(&db.pool).await.values().all(Option::is_some)
    })
    .await;
    let reads = api.stats().reads;
    let times: Vec<f64> = verified(&db.pool).await.into_values().flatten().collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    println!("60 customers verified over {spread:.1} s with {reads} reads");
    assert!(
        (60..=63).contains(&reads),
        "each customer once: {reads} reads"
    );
    // Spread over the period, not all at once, and within it (plus a tick or two).
    assert!(spread >= period_s / 2.0, "{spread:.1} s");
    assert!(spread <= period_s * 1.5, "{spread:.1} s");

    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let in_step = text
        .lines()
        .find_map(|l| l.strip_prefix("imprint_sync_reconcile_checked_total{result=\"in_step\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(in_step.is_some_and(|n| n >= 60.0), "{text}");
    for series in [
        "imprint_sync_reconcile_checked_total{result=\"drifted\"} 0",
        "imprint_sync_reconcile_checked_total{result=\"missing\"} 0",
        "imprint_sync_reconcile_checked_total{result=\"error\"} 0",
        "imprint_sync_reconcile_repaired_total 0",
    ] {
        assert!(text.contains(series), "{series}: {text}");
    }
    stop(daemon).await;
}

/// After a kill -9 the sweep goes on where it stopped: the customers still unchecked are
/// checked next, and the ones already verified are not read again before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_resumes_after_a_restart() {
    let (db, api, _) = start(19, 60).await;
    let overrides = &[
        ("RECONCILE__INTERVAL_MS", "250"),
        ("RECONCILE__CUSTOMERS_PER_TICK", "2"),
    ];
    let mut first = run_sweep(&db, &api, overrides);
    eventually(60, "a third of the customers are verified", || async {
        verified(&db.pool)
            .await
            .values()
            .filter(|v| v.is_some())
            .count()
            >= 20
    })
    .await;
    first.kill9().await;
    let before = verified(&db.pool).await;
    let done: BTreeMap<String, f64> = before
        .iter()
        .filter_map(|(id, v)| v.map(|v| (id.clone(), v)))
        .collect();
    let never: Vec<String> = sqlx::query_scalar(
        "SELECT customer_id FROM imprint_sync.customer_sync_state WHERE checked_at IS NULL",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!never.is_empty());
    api.reset();

    let second = run_sweep(&db, &api, overrides);
    eventually(60, "the customers never checked are verified", || async {
        let now = verified(&db.pool).await;
        never.iter().all(|id| now[id].is_some())
    })
    .await;
    let reads = api.stats().reads;
    let after = verified(&db.pool).await;
    let read_again = done
        .iter()
        .filter(|(id, v)| after[*id] != Some(**v))
        .count();
    println!(
        "{} verified before the kill, {} never checked; {reads} reads after the restart, {read_again} read again",
        done.len(),
        never.len()
    );
    assert!(
        reads <= never.len() as u64 + 4,
        "the walk started over: {reads} reads for {} customers left",
        never.len()
    );
    assert!(
        read_again <= 2,
        "{read_again} customers verified before were read again first"
    );
    stop(second).await;
}

/// A rejected key pauses the sweep like the sync: one request, then nothing until the next
/// probe, and no customer is marked checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_pauses_the_sweep() {
    let (db, api, _) = start(22, 20).await;
    api.reset();
    let overrides = &[
        ("API__KEY", "sk_test_wrong"),
        ("RECONCILE__INTERVAL_MS", "100"),
        ("RECONCILE__CUSTOMERS_PER_TICK", "5"),
    ];
    let daemon = run_sweep(&db, &api, overrides);
    eventually(30, "the key is tried", || async {
        api.stats().count(401) > 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        api.stats().count(401),
        1,
        "one probe per 10 s: {:?}",
        api.stats()
    );
    let touched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_sync_state
         WHERE checked_at IS NOT NULL OR verified_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(touched, 0, "customers taken were given back");
    assert!(!stop(daemon).await.contains("sk_test_wrong"));
}

/// An outage opens the circuit; with no change to send, the sweep's own probe finds the API
/// back, and the walk goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_probes_its_way_out_of_an_outage() {
    let (db, api, _) = start(23, 20).await;
    api.set_faults(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .unwrap();
    api.reset();
    let overrides = &[
        ("RECONCILE__INTERVAL_MS", "100"),
        ("RECONCILE__CUSTOMERS_PER_TICK", "1"),
    ];
    let daemon = run_sweep(&db, &api, overrides);
    // One customer per tick, three reads each: the second customer's reads open the circuit
    // (5 failures) and give up, and no read is left in flight to probe.
    eventually(30, "two customers' reads have failed", || async {
        api.stats().count(500) >= 6
    })
    .await;
    api.set_faults(Faults::default()).unwrap();
    eventually(
        60,
        "every customer is verified after the outage",
        || async { verified(&db.pool).await.values().all(Option::is_some) },
    )
    .await;
    stop(daemon).await;
}

/// While a backlog of changes drains, the sweep's reads stay within `max_share` of the rate,
/// and the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_reads_stay_within_their_share_while_a_backlog_drains() {
    let (db, api, _) = start(20, 100).await;
    // The backlog: 300 changes of other customers.
    seed_customers(&db.pool, 21, 300).await;
    api.reset();
    let overrides = &[
        ("RATE_LIMIT__REQUESTS_PER_SECOND", "50"),
        ("RATE_LIMIT__BURST", "10"),
        ("RECONCILE__MAX_SHARE", "0.2"),
        ("RECONCILE__INTERVAL_MS", "200"),
        // Far more than the share allows: the share is what holds it back.
        ("RECONCILE__PERIOD_HOURS", "0.0001"),
    ];
    let start = std::time::Instant::now();
    let daemon = run_sweep(&db, &api, overrides);
    eventually(120, "the backlog is synced", || async {
        common::counts(&db.pool).await.get("synced").copied() == Some(400)
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let stats = api.stats();
    let reads = stats.reads as f64;
    let posts = stats.requests_total as f64 - reads;
    println!(
        "{posts} updates and {reads} reads in {elapsed:.1} s: {:.1} reads/s (share 10/s)",
        reads / elapsed
    );
    // 20 % of 50/s, plus the share's burst of 2. Changes go first: while they use the whole
    // rate, the reads wait for tokens left over.
    assert!(
        reads <= 10.0 * elapsed + 2.0,
        "{reads} reads in {elapsed:.1} s"
    );
    assert_eq!(stats.count(429), 0, "{stats:?}");

    // With the backlog gone the sweep has the room, and still keeps to its share.
    let before = api.stats().reads;
    let start = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let idle = (api.stats().reads - before) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    println!("then {idle} reads in {elapsed:.1} s without a backlog");
    assert!(idle >= 10.0, "the sweep reads when there is room: {idle}");
    assert!(
        idle <= 10.0 * elapsed + 2.0,
        "{idle} reads in {elapsed:.1} s"
    );
    stop(daemon).await;
}

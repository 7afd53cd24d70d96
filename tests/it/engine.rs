//! The engine's guarantees (DESIGN §1) and answer table (§3), driven in this process against
//! a real PostgreSQL and a real HTTP server (the sandbox, or wiremock for exact answers).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    TestDb, attempts, counts, customer_id, insert, profile, row, rows, run_once, sandbox,
    version_of,
};
use imprint_sync::outbox::store::Store;
use imprint_sync::sandbox::Faults;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn faults(latency_ms: u64, fail_rate: f64) -> Faults {
    Faults {
        latency_ms,
        fail_rate,
        ..Faults::default()
    }
}

/// G1 + G3: many customers with several versions each, one request in five answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_newest_version_is_sent_one_request_at_a_time() {
    let db = TestDb::new().await;
    let sandbox = sandbox(faults(2, 0.1)).await;
    let newest = common::seed_versions(&db.pool, 1, 300).await;
    let total: u32 = newest.values().sum();

    let summary = run_once(&db, &sandbox.base_url(), &[]).await;

    common::assert_newest_only(&db.pool, &sandbox, &newest).await;
    assert_eq!(summary.synced, 300);
    assert_eq!(summary.failed, 0);
    assert_eq!(summary.superseded, u64::from(total) - 300);
    assert!(summary.retried > 0, "a 10% failure rate retried nothing");
}

/// G3: three pending versions of one customer make one request; the older two are
/// superseded by the newest without a request.
#[tokio::test]
async fn pending_versions_coalesce_into_one_request() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(3, 1);
    let ids = insert(&db.pool, &[profile(&c, 1), profile(&c, 2), profile(&c, 3)]).await;

    run_once(&db, &sandbox.base_url(), &[]).await;

    assert_eq!(sandbox.stats().requests_total, 1);
    let sent: Vec<_> = sandbox.journal(&c).iter().map(version_of).collect();
    assert_eq!(sent, [Some(3)]);
    for old in &ids[..2] {
        let r = row(&db.pool, *old).await;
        assert_eq!(
            (r.sync_status.as_str(), r.superseded_by),
            ("superseded", Some(ids[2]))
        );
        assert!(attempts(&db.pool, *old).await.is_empty());
    }
    assert_eq!(row(&db.pool, ids[2]).await.sync_status, "synced");
}

/// G2: a row older than the customer's last synced row is superseded and never sent, even
/// when it arrives later.
#[tokio::test]
async fn a_row_older_than_the_last_synced_one_is_never_sent() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(2, 1);
    let mut v1 = profile(&c, 1);
    v1["id"] = json!(10);
    let mut v2 = profile(&c, 2);
    v2["id"] = json!(20);
    insert(&db.pool, &[v1, v2]).await;
    run_once(&db, &sandbox.base_url(), &[]).await;
    assert_eq!(row(&db.pool, 20).await.sync_status, "synced");
    let before = sandbox.journal(&c);

    // A late row with a lower id (a partner's slow transaction, a restored backup).
    let mut late = profile(&c, 9);
    late["id"] = json!(15);
    insert(&db.pool, &[late]).await;
    let summary = run_once(&db, &sandbox.base_url(), &[]).await;

    let r = row(&db.pool, 15).await;
    assert_eq!(
        (r.sync_status.as_str(), r.superseded_by),
        ("superseded", Some(20))
    );
    assert_eq!(summary.superseded, 1);
    assert_eq!(sandbox.journal(&c), before, "the older row was sent");
    assert!(attempts(&db.pool, 15).await.is_empty());
    let last: i64 = common::sync_state(&db.pool, &c, "last_synced_outbox_id").await;
    assert_eq!(last, 20);
}

/// G4: a row left `in_flight` by a dead worker is taken again once its lease has expired.
#[tokio::test]
async fn an_expired_lease_is_taken_again() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(4, 1);
    let id = insert(&db.pool, &[profile(&c, 1)]).await[0];
    sqlx::query(
        "UPDATE imprint_sync.customer_outbox
         SET sync_status = 'in_flight', leased_by = 'dead-worker',
             lease_expires_at = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();

    run_once(&db, &sandbox.base_url(), &[]).await;

    assert_eq!(row(&db.pool, id).await.sync_status, "synced");
    assert_eq!(sandbox.journal(&c).len(), 1);
    let worker: String =
        sqlx::query_scalar("SELECT worker_id FROM imprint_sync.sync_attempts WHERE outbox_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_ne!(worker, "dead-worker");
}

/// G7: each kind of bad value fails its own row (naming the field, without a request) and
/// the rows around it are synced.
#[tokio::test]
async fn a_bad_field_fails_its_row_and_the_line_goes_on() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let big = "x".repeat(300);
    let huge: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("k{i}"), Value::String("y".repeat(1000))))
        .collect();
    // (customer, column, bad value, the field the error must name)
    let cases: Vec<(String, &str, Value, &str)> = vec![
        (customer_id(7, 1), "phone", json!("+0123"), "phone"),
        (
            customer_id(7, 2),
            "email",
            json!("no-at-sign.example.com"),
            "email",
        ),
        (customer_id(7, 3), "country", json!("XQZ"), "country"),
        (
            customer_id(7, 4),
            "ltv_currency",
            json!("QQQ"),
            "ltv_currency",
        ),
        (
            customer_id(7, 5),
            "preferred_language",
            json!("klingon"),
            "preferred_language",
        ),
        (customer_id(7, 6), "metadata", json!([1, 2, 3]), "metadata"),
        (customer_id(7, 7), "metadata", json!("a string"), "metadata"),
        (
            customer_id(7, 8),
            "metadata",
            Value::Object(huge),
            "metadata",
        ),
        (customer_id(7, 9), "first_name", json!(big), "first_name"),
        ("a/b".into(), "customer_id", json!("a/b"), "customer_id"),
        ("../x".into(), "customer_id", json!("../x"), "customer_id"),
    ];
    let mut seeded = vec![profile(&customer_id(8, 0), 1)];
    for (n, (c, column, value, _)) in (1..).zip(&cases) {
        let mut bad = profile(c, 1);
        bad[*column] = value.clone();
        seeded.push(bad);
        seeded.push(profile(&customer_id(8, n), 1));
    }
    let ids = insert(&db.pool, &seeded).await;

    let summary = run_once(&db, &sandbox.base_url(), &[]).await;

    for (i, (c, _, value, field)) in cases.iter().enumerate() {
        let r = row(&db.pool, ids[2 * i + 1]).await;
        assert_eq!(r.sync_status, "failed", "{field}");
        assert_eq!(r.last_error_code.as_deref(), Some("invalid_profile"));
        let message = r.last_error.unwrap_or_default();
        assert!(message.contains(field), "{message:?} does not name {field}");
        if let Some(v) = value.as_str().filter(|v| v.len() > 3) {
            assert!(!message.contains(v), "{message:?} echoes the value");
        }
        assert!(sandbox.journal(c).is_empty(), "{field}: a request was sent");
        assert!(attempts(&db.pool, r.id).await.is_empty());
    }
    let good = cases.len() + 1;
    assert_eq!(counts(&db.pool).await.get("synced"), Some(&(good as i64)));
    assert_eq!(sandbox.stats().requests_total, good as u64);
    assert_eq!(summary.failed, cases.len() as u64);
}

fn customer_body(id: &str) -> Value {
    json!({"id": id, "statuses": {"Imprint Card": "OPEN"}, "updated_at": "2026-01-02T03:04:05Z"})
}

/// Answers `responses` in order for `customer`, then a customer object for ever.
async fn answer(server: &MockServer, customer: &str, responses: Vec<ResponseTemplate>) {
    let route = format!("/v2/customers/{customer}");
    for (priority, r) in (1..).zip(responses) {
        Mock::given(method("POST"))
            .and(path(route.clone()))
            .respond_with(r)
            .up_to_n_times(1)
            .with_priority(priority)
            .mount(server)
            .await;
    }
    Mock::given(method("POST"))
        .and(path(route))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer_body(customer)))
        .with_priority(u8::MAX)
        .mount(server)
        .await;
}

/// A row's end: status, error code, text in the message, attempts, and the HTTP status of
/// each logged attempt.
type Expected = (
    &'static str,
    Option<&'static str>,
    &'static str,
    i32,
    &'static [Option<i32>],
);

fn error_body(status: u16, kind: &str, message: &str, param: Option<&str>) -> ResponseTemplate {
    let mut e = json!({"type": kind, "message": message});
    if let Some(p) = param {
        e["param"] = json!(p);
    }
    ResponseTemplate::new(status).set_body_json(json!({ "error": e }))
}

/// §3 through the engine: what each answer does to the row, and one `sync_attempts` row per
/// HTTP attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_answer_moves_the_row_as_the_table_says() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let invalid = error_body(400, "INVALID_REQUEST_ERROR", "bad email", Some("email"));
    let unprocessable = error_body(422, "VALIDATION_ERROR", "bad phone", Some("phone"));
    // No body at all: the status alone must say "customer not found".
    let not_found = ResponseTemplate::new(404);
    let boom = || error_body(500, "API_ERROR", "it broke", None);
    let conflict = error_body(409, "CONFLICT_ERROR", "try again", None);
    let unreadable = ResponseTemplate::new(200).set_body_string("<html>oops</html>");
    let always_503 = error_body(503, "UNAVAILABLE", "down for maintenance", None);

    // Each customer gets its answers in order, then a 200 with a customer object.
    let c = |n| customer_id(9, n);
    answer(&server, &c(1), vec![invalid]).await;
    answer(&server, &c(2), vec![unprocessable]).await;
    answer(&server, &c(3), vec![not_found]).await;
    answer(&server, &c(4), vec![boom(), boom()]).await;
    answer(&server, &c(5), vec![conflict]).await;
    answer(&server, &c(6), vec![unreadable]).await;
    answer(&server, &c(7), vec![always_503; 10]).await;
    answer(&server, &c(8), vec![]).await;
    let ids = insert(
        &db.pool,
        &(1..=8).map(|n| profile(&c(n), 1)).collect::<Vec<_>>(),
    )
    .await;
    let api = Url::parse(&server.uri()).unwrap();

    let summary = run_once(&db, &api, &[("SYNC__MAX_ATTEMPTS", "3")]).await;

    let expect: [Expected; 8] = [
        (
            "failed",
            Some("INVALID_REQUEST_ERROR"),
            "email",
            1,
            &[Some(400)],
        ),
        ("failed", Some("VALIDATION_ERROR"), "phone", 1, &[Some(422)]),
        (
            "failed",
            Some("CUSTOMER_NOT_FOUND_ERROR"),
            "",
            1,
            &[Some(404)],
        ),
        ("synced", None, "", 3, &[Some(500), Some(500), Some(200)]),
        ("synced", None, "", 2, &[Some(409), Some(200)]),
        // Accepted though unreadable: synced once, marked unverified.
        (
            "synced",
            Some("unverified_response"),
            "accepted",
            1,
            &[Some(200)],
        ),
        (
            "failed",
            Some("max_attempts_exceeded"),
            "HTTP 503 UNAVAILABLE",
            3,
            &[Some(503); 3],
        ),
        ("synced", None, "", 1, &[Some(200)]),
    ];
    for (id, (status, code, message, n, http)) in ids.iter().zip(expect) {
        let r = row(&db.pool, *id).await;
        assert_eq!(r.sync_status, status, "row {id}: {r:?}");
        assert_eq!(r.last_error_code.as_deref(), code, "row {id}");
        assert!(
            r.last_error
                .as_deref()
                .unwrap_or_default()
                .contains(message),
            "row {id}: {:?} lacks {message:?}",
            r.last_error
        );
        assert_eq!(r.attempts, n, "row {id}: attempts");
        let logged: Vec<_> = attempts(&db.pool, *id)
            .await
            .into_iter()
            .map(|a| a.1)
            .collect();
        assert_eq!(logged, http, "row {id}: sync_attempts");
        assert_eq!(r.last_http_status, *http.last().unwrap(), "row {id}");
    }
    assert_eq!(summary.failed, 4);
    assert_eq!(summary.synced, 4);
}

/// After a sync, `customer_sync_state` holds Imprint's view without `ssn4` and
/// `date_of_birth`, unless configured to keep them.
#[tokio::test]
async fn sync_state_keeps_sensitive_fields_only_when_configured() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let (plain, kept) = (customer_id(10, 1), customer_id(10, 2));
    let first = insert(&db.pool, &[profile(&plain, 1)]).await[0];
    run_once(&db, &sandbox.base_url(), &[]).await;
    let second = insert(&db.pool, &[profile(&kept, 1)]).await[0];
    let keep = [("PRIVACY__STORE_SENSITIVE_RESPONSE_FIELDS", "true")];
    run_once(&db, &sandbox.base_url(), &keep).await;

    // The sandbox does answer with them: dropping them is the daemon's doing.
    assert!(sandbox.customer(&plain).unwrap().get("ssn4").is_some());
    let state: BTreeMap<String, (i64, Value, Option<Value>)> =
        sqlx::query_as::<_, (String, i64, Value, Option<Value>)>(
            "SELECT customer_id, last_synced_outbox_id, response, statuses
         FROM imprint_sync.customer_sync_state",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(c, id, response, statuses)| (c, (id, response, statuses)))
        .collect();
    let (id, response, statuses) = &state[&plain];
    assert_eq!(*id, first);
    assert_eq!(response["id"], json!(plain));
    assert!(response.get("ssn4").is_none() && response.get("date_of_birth").is_none());
    assert_eq!(statuses.as_ref(), Some(&json!({"Imprint Card": "OPEN"})));
    let (id, response, _) = &state[&kept];
    assert_eq!(*id, second);
    assert!(response.get("ssn4").is_some() && response.get("date_of_birth").is_some());
}

/// G6: while requests are in flight (each takes 500 ms), no transaction of the daemon lasts
/// long enough to span one (the claim is a few statements in one short transaction), and no
/// statement runs long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transaction_stays_open_across_a_request() {
    let db = TestDb::new().await;
    let sandbox = sandbox(faults(500, 0.0)).await;
    common::seed_customers(&db.pool, 11, 24).await;
    let engine = common::engine(&db, &sandbox.base_url(), &[("SYNC__CONCURRENCY", "8")]);
    let run = tokio::spawn(async move { engine.run(CancellationToken::new()).await });

    let mut admin = db.admin().await;
    let (mut samples, mut with_rows_in_flight) = (0, 0);
    while !run.is_finished() {
        let offenders: Vec<(String, Option<String>, f64)> = sqlx::query_as(
            "SELECT state, left(query, 80),
                    extract(epoch FROM now() - COALESCE(query_start, xact_start))::float8
             FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()
               AND ((state LIKE 'idle in transaction%'
                     AND now() - xact_start > interval '400 milliseconds')
                    OR (state = 'active' AND now() - query_start > interval '200 milliseconds'))",
        )
        .bind(&db.name)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(
            offenders.is_empty(),
            "sessions of the daemon: {offenders:?}"
        );
        samples += 1;
        if counts(&db.pool).await.contains_key("in_flight") {
            with_rows_in_flight += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = run.await.unwrap();
    assert_eq!(summary.synced, 24);
    assert!(
        with_rows_in_flight >= 3,
        "only {with_rows_in_flight} of {samples} samples saw rows in flight"
    );
}

/// Retention deletes old `synced` and `superseded` rows and old attempts, in batches, and
/// never a `failed`, `pending` or recent row.
#[tokio::test]
async fn the_janitor_deletes_only_old_finished_rows() {
    let db = TestDb::new().await;
    let c = customer_id(12, 1);
    let statuses = ["synced", "superseded", "failed", "pending"];
    let mut seeded = Vec::new();
    for age_days in [40, 1] {
        for status in statuses {
            let mut r = profile(&c, 1);
            r["sync_status"] = json!(status);
            r["updated_at"] =
                json!((chrono::Utc::now() - chrono::Duration::days(age_days)).to_rfc3339());
            seeded.push(r);
        }
    }
    let ids = insert(&db.pool, &seeded).await;
    for (days, outbox_id) in [(20, ids[0]), (20, ids[1]), (2, ids[4])] {
        sqlx::query(
            "INSERT INTO imprint_sync.sync_attempts
                (outbox_id, customer_id, attempt, started_at, duration_ms, outcome, worker_id)
             VALUES ($1, $2, 1, now() - $3 * interval '1 day', 5, 'synced', 'w')",
        )
        .bind(outbox_id)
        .bind(&c)
        .bind(days)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let store = Store::new(db.pool.clone(), "janitor-test");

    let mut deleted = 0;
    loop {
        match store.prune(30, 14, 1).await.unwrap() {
            0 => break,
            n => deleted += n,
        }
    }

    assert_eq!(deleted, 4, "two old finished rows and two old attempts");
    let left: Vec<(i64, String)> = rows(&db.pool)
        .await
        .into_iter()
        .map(|r| (r.id, r.sync_status))
        .collect();
    let kept_old = [
        (ids[2], "failed".to_owned()),
        (ids[3], "pending".to_owned()),
    ];
    assert!(kept_old.iter().all(|k| left.contains(k)), "{left:?}");
    assert_eq!(left.len(), 6, "{left:?}");
    assert!(!left.iter().any(|(id, _)| *id == ids[0] || *id == ids[1]));
    let attempts_left: Vec<i64> =
        sqlx::query_scalar("SELECT outbox_id FROM imprint_sync.sync_attempts")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts_left, [ids[4]]);
}

/// NUL bytes in an answer (an error body from a proxy, a returned string) cannot go into
/// PostgreSQL text or jsonb; they are dropped, and the batch is written (G7: the line goes on).
#[tokio::test]
async fn nul_bytes_in_answers_never_stop_the_write_back() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let c = |n| customer_id(11, n);
    let nul_error = ResponseTemplate::new(502).set_body_bytes(b"bad\0gateway".to_vec());
    answer(&server, &c(1), vec![nul_error]).await;
    let nul_name = json!({"id": c(2), "first_name": "A\u{0}da", "statuses": {"P": "OPEN"}});
    Mock::given(method("POST"))
        .and(path(format!("/v2/customers/{}", c(2))))
        .respond_with(ResponseTemplate::new(200).set_body_json(nul_name))
        .mount(&server)
        .await;
    answer(&server, &c(3), vec![]).await;
    let ids = insert(
        &db.pool,
        &[profile(&c(1), 1), profile(&c(2), 1), profile(&c(3), 1)],
    )
    .await;
    let api = Url::parse(&server.uri()).unwrap();

    let summary = run_once(&db, &api, &[]).await;

    assert_eq!(summary.failed, 0);
    for id in &ids {
        assert_eq!(row(&db.pool, *id).await.sync_status, "synced", "row {id}");
    }
    let first_try = attempts(&db.pool, ids[0]).await;
    assert_eq!(
        first_try[0].1,
        Some(502),
        "the 502 was logged: {first_try:?}"
    );
    let stored: String = common::sync_state(&db.pool, &c(2), "response->>'first_name'").await;
    assert_eq!(stored, "Ada");
}

/// An outcome belongs to one claim: after the row's lease expired and the row was claimed
/// again (even by the same worker), the old outcome is not written onto the new claim.
#[tokio::test]
async fn a_stale_outcome_is_not_written_onto_a_new_claim() {
    use imprint_sync::outbox::store::Store;
    let db = TestDb::new().await;
    let ids = insert(&db.pool, &[profile(&customer_id(12, 1), 1)]).await;
    let store = Store::new(db.pool.clone(), "worker-a");
    let first = store.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(first.rows.len(), 1);
    // The lease runs out; the row is rescued and claimed again by the same worker.
    sqlx::query(
        "UPDATE imprint_sync.customer_outbox SET lease_expires_at = now() - interval '1 s'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(store.rescue_expired().await.unwrap(), 1);
    let second = store.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(second.rows.len(), 1);
    assert_ne!(
        first.rows[0].lease_expires_at,
        second.rows[0].lease_expires_at
    );

    let applied = store
        .record(&[common::refused(
            ids[0],
            &customer_id(12, 1),
            first.rows[0].lease_expires_at,
        )])
        .await
        .unwrap();
    assert!(
        applied.is_empty(),
        "the stale outcome was written: {applied:?}"
    );
    assert_eq!(row(&db.pool, ids[0]).await.sync_status, "in_flight");
    let applied = store
        .record(&[common::refused(
            ids[0],
            &customer_id(12, 1),
            second.rows[0].lease_expires_at,
        )])
        .await
        .unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(row(&db.pool, ids[0]).await.sync_status, "failed");
}

/// `customer_sync_state.accepted` keeps, per column, the newest value Imprint accepted: a
/// later request that sets only the phone leaves the accepted e-mail in place.
#[tokio::test]
async fn accepted_columns_merge_per_column_across_syncs() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(9, 1);
    insert(&db.pool, &[profile(&c, 1)]).await;
    run_once(&db, &sandbox.base_url(), &[]).await;
    insert(
        &db.pool,
        &[json!({"customer_id": c, "phone": "+14155550199"})],
    )
    .await;
    run_once(&db, &sandbox.base_url(), &[]).await;

    let accepted: Value = common::sync_state(&db.pool, &c, "accepted").await;
    let expected_email = format!("v1.{}@example.com", c.to_lowercase());
    assert_eq!(accepted["email"], json!(expected_email));
    assert_eq!(
        accepted["phone"],
        json!("+14155550199"),
        "the newer phone, as sent"
    );
    assert_eq!(accepted["country"], json!("USA"));
    assert_eq!(accepted["metadata"], json!({"version": 1}));
    assert!(accepted.get("customer_history").is_none(), "{accepted}");
}

/// The API's messages may echo the value they refuse: `last_error` and the attempt log keep
/// the field name and the error code, never the API's own words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_own_words_are_never_stored() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let canaries = ["ada.canary@example.com", "+14155550123", "Quuxington"];
    let c = |n| customer_id(12, n);
    answer(
        &server,
        &c(1),
        vec![error_body(
            400,
            "INVALID_REQUEST_ERROR",
            "bad email: ada.canary@example.com",
            Some("email"),
        )],
    )
    .await;
    let spring = json!({"error": "Unprocessable Entity", "status": 422,
        "details": ["phone: +14155550123 is not a valid phone number"]});
    answer(
        &server,
        &c(2),
        vec![ResponseTemplate::new(422).set_body_json(spring)],
    )
    .await;
    answer(
        &server,
        &c(3),
        vec![error_body(503, "API_ERROR", "could not store Quuxington", None); 3],
    )
    .await;
    answer(
        &server,
        &c(4),
        vec![ResponseTemplate::new(400).set_body_string("no such user ada.canary@example.com")],
    )
    .await;
    let ids = insert(
        &db.pool,
        &(1..=4).map(|n| profile(&c(n), 1)).collect::<Vec<_>>(),
    )
    .await;
    let api = Url::parse(&server.uri()).unwrap();

    run_once(&db, &api, &[("SYNC__MAX_ATTEMPTS", "2")]).await;

    let expect = [
        ("INVALID_REQUEST_ERROR", "email"),
        ("http_422", "phone"),
        ("max_attempts_exceeded", "API_ERROR"),
        ("http_400", "400"),
    ];
    for (id, (code, names)) in ids.iter().zip(expect) {
        let r = row(&db.pool, *id).await;
        assert_eq!(r.sync_status, "failed", "row {id}: {r:?}");
        assert_eq!(r.last_error_code.as_deref(), Some(code), "row {id}");
        let stored = r.last_error.clone().unwrap_or_default();
        assert!(
            stored.contains(names),
            "row {id}: {stored:?} lacks {names:?}"
        );
        let logged: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT error_message FROM imprint_sync.sync_attempts WHERE outbox_id = $1",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        for text in logged.into_iter().flatten().chain([stored]) {
            for canary in canaries {
                assert!(!text.contains(canary), "row {id} stored {text:?}");
            }
        }
    }
}

/// A 2xx is trusted only as far as it can be read: a customer object of another customer is
/// not this customer's state (retried); a 204 or a body that is not a customer object means
/// the update was accepted but cannot be verified: `synced`, no response kept, a code saying
/// so, and no second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_is_trusted_only_as_far_as_it_can_be_read() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let c = |n| customer_id(13, n);
    let other = ResponseTemplate::new(200).set_body_json(customer_body(&c(99)));
    answer(&server, &c(1), vec![other]).await;
    answer(&server, &c(2), vec![ResponseTemplate::new(204); 5]).await;
    let html = ResponseTemplate::new(200).set_body_string("<html>ok</html>");
    answer(&server, &c(3), vec![html; 5]).await;
    // More unverifiable answers in a row than the circuit's threshold: none is a failure.
    for n in 4..=10 {
        answer(&server, &c(n), vec![ResponseTemplate::new(202); 5]).await;
    }
    let ids = insert(
        &db.pool,
        &(1..=10).map(|n| profile(&c(n), 1)).collect::<Vec<_>>(),
    )
    .await;
    let api = Url::parse(&server.uri()).unwrap();

    let summary = run_once(
        &db,
        &api,
        &[("SYNC__MAX_ATTEMPTS", "1"), ("SYNC__CONCURRENCY", "1")],
    )
    .await;

    let response = |customer: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<Value>>(
                "SELECT response FROM imprint_sync.customer_sync_state WHERE customer_id = $1",
            )
            .bind(customer)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    // Another customer's object: not synced on its word.
    let first = row(&db.pool, ids[0]).await;
    assert_eq!(
        (first.sync_status.as_str(), first.last_error_code.as_deref()),
        ("failed", Some("max_attempts_exceeded")),
        "{first:?}"
    );
    assert!(
        first
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("unreadable_response"),
        "{first:?}"
    );
    assert_eq!(
        response(c(1)).await,
        None,
        "no state stored from another customer's object"
    );
    for (n, id) in (2..=10).zip(&ids[1..]) {
        let r = row(&db.pool, *id).await;
        assert_eq!(r.sync_status, "synced", "row {id}: {r:?}");
        assert_eq!(
            r.last_error_code.as_deref(),
            Some("unverified_response"),
            "row {id}"
        );
        assert_eq!(r.attempts, 1, "row {id}: not retried");
        assert_eq!(
            response(c(n)).await,
            Some(None),
            "row {id}: no response kept"
        );
    }
    assert_eq!(row(&db.pool, ids[1]).await.last_http_status, Some(204));
    assert_eq!(summary.synced, 9);
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        10,
        "one request per row"
    );
}

/// A database that turns read-only under the recorder (a failover to a replica: SQLSTATE
/// 25006) refuses no outcome for good: the recorder keeps them and writes them once the
/// database takes writes again, so no row is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_outlive_a_read_only_database() {
    let db = TestDb::new().await;
    let sandbox = sandbox(faults(1_500, 0.0)).await;
    common::seed_customers(&db.pool, 14, 20).await;
    let api = sandbox.base_url();
    let overrides = [("SYNC__CONCURRENCY", "20"), ("SYNC__BATCH_SIZE", "20")];
    let engine = common::engine(&db, &api, &overrides);
    let run = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(90),
            engine.run(CancellationToken::new()),
        )
        .await
    });
    common::eventually(30, "every row is in flight", || async {
        counts(&db.pool).await.get("in_flight") == Some(&20)
    })
    .await;
    db.set_read_only(true).await;
    // The answers come back (1.5 s) while the database refuses writes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    db.set_read_only(false).await;

    let summary = run.await.unwrap().expect("the run ends");
    assert_eq!(counts(&db.pool).await.get("synced"), Some(&20));
    assert_eq!(summary.synced, 20);
    assert_eq!(sandbox.stats().requests_total, 20, "no row was sent twice");
}

/// `ssn4` and `date_of_birth` are kept out of the stored response wherever the API puts
/// them: in another case or spelling (`SSN4`, `dateOfBirth`), or nested in an object the
/// daemon does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_fields_are_not_stored_under_another_name_or_nested() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let c = customer_id(15, 1);
    let body = json!({
        "id": c, "ssn4": "8841", "SSN4": "8841", "dateOfBirth": {"year": 1971},
        "identity": {"ssn4": "8841", "date_of_birth": {"year": 1971, "month": 3, "day": 9}},
        "kyc": [{"Date_Of_Birth": "1971-03-09"}],
        "statuses": {"Imprint Card": "OPEN"}, "loyalty": {"tier": "GOLD"},
    });
    answer(
        &server,
        &c,
        vec![ResponseTemplate::new(200).set_body_json(body)],
    )
    .await;
    let ids = insert(&db.pool, &[profile(&c, 1)]).await;
    run_once(&db, &Url::parse(&server.uri()).unwrap(), &[]).await;

    assert_eq!(row(&db.pool, ids[0]).await.sync_status, "synced");
    let response: Value = common::sync_state(&db.pool, &c, "response").await;
    let text = response.to_string();
    assert!(
        !text.contains("8841") && !text.contains("1971"),
        "stored: {text}"
    );
    assert_eq!(
        response["loyalty"],
        json!({"tier": "GOLD"}),
        "the rest is kept"
    );
    let statuses: Value = common::sync_state(&db.pool, &c, "statuses").await;
    assert_eq!(
        statuses,
        json!({"Imprint Card": "OPEN"}),
        "in their own column"
    );
}

/// One row whose outcome the database refuses with an error a trigger raises (a partner's
/// audit trigger: `RAISE EXCEPTION`, SQLSTATE P0001) holds back no other row's outcome: the
/// recorder writes the others row by row, instead of waiting for ever on the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_refused_by_a_trigger_holds_back_no_other() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let poison = customer_id(16, 99);
    let audit = format!(
        "CREATE FUNCTION imprint_sync.audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF OLD.sync_status = 'in_flight' AND NEW.customer_id = '{poison}' THEN
             RAISE EXCEPTION 'audit refused';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER audit BEFORE UPDATE ON imprint_sync.customer_outbox
           FOR EACH ROW EXECUTE FUNCTION imprint_sync.audit();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(audit))
        .execute(&db.pool)
        .await
        .unwrap();
    insert(&db.pool, &[profile(&poison, 1)]).await;
    let engine = common::engine(&db, &sandbox.base_url(), &[]);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { engine.run(stop).await }
    });
    common::eventually(30, "the poison row is sent", || async {
        !sandbox.journal(&poison).is_empty()
    })
    .await;
    // Its outcome is refused now; the rows that come after must still be recorded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::seed_customers(&db.pool, 16, 9).await;

    common::eventually(30, "the nine other rows are synced", || async {
        counts(&db.pool).await.get("synced") == Some(&9)
    })
    .await;
    stop.cancel();
    run.await.unwrap();
}

/// G7 with migration 0007: a 100 KB customer_id is stored under a marker; its row fails
/// alone as invalid_profile naming customer_id, and the rows beside it sync.
#[tokio::test]
async fn an_oversized_customer_id_fails_alone() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let before = insert(&db.pool, &[profile(&customer_id(9, 1), 1)]).await;
    let oversized: i64 = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email)
         VALUES (repeat('x', 100000), 'o@example.com') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the insert never fails");
    let after = insert(&db.pool, &[profile(&customer_id(9, 2), 1)]).await;

    let summary = run_once(&db, &sandbox.base_url(), &[]).await;

    let r = row(&db.pool, oversized).await;
    assert_eq!(r.sync_status, "failed");
    assert_eq!(r.last_error_code.as_deref(), Some("invalid_profile"));
    let message = r.last_error.unwrap_or_default();
    assert!(message.contains("customer_id"), "{message:?}");
    for id in [before[0], after[0]] {
        assert_eq!(row(&db.pool, id).await.sync_status, "synced");
    }
    assert_eq!(sandbox.stats().requests_total, 2);
    assert_eq!(summary.failed, 1);
}

/// G5 with G2: a write-back skips the wait for its WAL flush only where a database crash
/// could lose nothing but bookkeeping. A quiet period is more: lost with its outcome, the row
/// is rescued when its lease ends (up to `api.timeout_ms` before the quiet period would have),
/// and a newer row goes out while the timed-out request may still be applied. A deferred
/// trigger sees each commit's `synchronous_commit` (it runs just before COMMIT); the store's
/// pool has one connection, so the claim after a quick write-back also shows that the setting
/// ended with that statement.
#[tokio::test]
async fn a_write_back_that_starts_a_quiet_period_waits_for_the_disk() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE public.commits (synchronous_commit text);
         CREATE FUNCTION public.log_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO public.commits VALUES (current_setting('synchronous_commit'));
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER log_commit AFTER UPDATE ON imprint_sync.customer_outbox
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.log_commit();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // The settings the commits since the last look ran under.
    let commits = || async {
        sqlx::query_scalar::<_, String>(
            "WITH seen AS (DELETE FROM public.commits RETURNING synchronous_commit)
             SELECT DISTINCT synchronous_commit FROM seen ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let (quick, quiet) = (customer_id(17, 1), customer_id(17, 2));
    let ids = insert(&db.pool, &[profile(&quick, 1), profile(&quiet, 1)]).await;
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let store = Store::new(one.clone(), "durable");
    let claim = store.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claim.rows.len(), 2);
    assert_eq!(commits().await, ["on"], "the claim");

    let lease = |id| {
        claim
            .rows
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .lease_expires_at
    };
    let applied = store
        .record(&[common::refused(ids[0], &quick, lease(ids[0]))])
        .await
        .unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(
        commits().await,
        ["off"],
        "a write-back without a quiet period"
    );
    let shown: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&one)
        .await
        .unwrap();
    assert_eq!(
        shown, "on",
        "the setting outlived the write-back's transaction"
    );

    let timed_out = imprint_sync::outbox::record::Record {
        disposition: imprint_sync::outbox::record::Disposition::Retry {
            delay: Duration::ZERO,
            counts: true,
        },
        http_status: None,
        error_code: Some("timeout".into()),
        error: Some("no answer within api.timeout_ms".into()),
        hold: Some(Duration::from_secs(10)),
        ..common::refused(ids[1], &quiet, lease(ids[1]))
    };
    let applied = store.record(&[timed_out]).await.unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(
        commits().await,
        ["on"],
        "a write-back that starts a quiet period returned before its WAL was on disk"
    );

    // The next claim (the quiet customer's row is deferred) commits synchronously.
    store.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(commits().await, ["on"], "a claim after the write-backs");
}

/// Issue 11, the write-back's weight: what Imprint answers is stored once. The values it
/// echoed exactly as sent are in `accepted` already, and the card statuses in `statuses`, so
/// `response` keeps only the rest: Imprint's own fields and whatever it holds otherwise than
/// sent (a case changed, a value replaced), so nothing Imprint said is lost.
#[tokio::test]
async fn an_answer_is_stored_once_beside_what_was_accepted() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let c = customer_id(11, 1);
    let sent = profile(&c, 1);
    let echoed = json!({
        "id": c,
        "email": sent["email"].as_str().unwrap().to_uppercase(),
        "phone": "+14155550199",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "preferred_language": "en",
        "address": {"street_line1": "1 Main St", "city": "Springfield", "state": "IL",
                    "postal_code": "62701", "country": "US"},
        "metadata": {"version": 1, "tier": "gold"},
        "statuses": {"Imprint Card": "OPEN"},
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-02T00:00:00Z",
    });
    answer(
        &server,
        &c,
        vec![ResponseTemplate::new(200).set_body_json(echoed)],
    )
    .await;
    insert(&db.pool, &[sent]).await;
    let api = Url::parse(&server.uri()).unwrap();

    let summary = run_once(&db, &api, &[]).await;

    assert_eq!(summary.synced, 1);
    let stored: Value = common::sync_state(&db.pool, &c, "response").await;
    assert_eq!(
        stored,
        json!({
            "id": c,
            "email": profile(&c, 1)["email"].as_str().unwrap().to_uppercase(),
            "phone": "+14155550199",
            "address": {"country": "US", "street_line2": null},
            "metadata": {"version": 1, "tier": "gold"},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-02T00:00:00Z",
        }),
        "the response keeps what `accepted` and `statuses` do not hold"
    );
    let statuses: Value = common::sync_state(&db.pool, &c, "statuses").await;
    assert_eq!(statuses, json!({"Imprint Card": "OPEN"}));
    let accepted: Value = common::sync_state(&db.pool, &c, "accepted").await;
    assert_eq!(accepted["first_name"], "Ada");
    assert_eq!(accepted["city"], "Springfield");
    let drift: Value = common::sync_state(&db.pool, &c, "drift").await;
    assert_eq!(drift, json!(["phone", "country"]), "drift is unchanged");
}

/// What Imprint said survives `response` storing it once. Three answers the old rule lost:
/// a sent metadata key Imprint dropped (which one? `drift` only says "metadata"); an empty
/// `address`/`metadata` Imprint returned for a request that sent neither; and a field this
/// request did not send and Imprint no longer returns, which read as "echoed as sent" and so
/// as the stale value in `accepted`.
#[tokio::test]
async fn an_answer_stored_once_loses_nothing_imprint_said() {
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let api = Url::parse(&server.uri()).unwrap();
    let (dropped_key, empty, forgotten) =
        (customer_id(12, 1), customer_id(12, 2), customer_id(12, 3));

    let mut two_keys = profile(&dropped_key, 1);
    two_keys["metadata"] = json!({"version": 1, "tier": "gold"});
    let mut echo = two_keys.clone();
    echo["id"] = json!(dropped_key);
    echo["metadata"] = json!({"version": 1});
    let echo_of = |p: &Value, id: &str| {
        let mut e = p.clone();
        e["id"] = json!(id);
        let o = e.as_object_mut().unwrap();
        o.remove("customer_id");
        let address: Map<String, Value> =
            ["street_line1", "city", "state", "postal_code", "country"]
                .iter()
                .filter_map(|k| o.remove(*k).map(|v| ((*k).to_owned(), v)))
                .collect();
        o.insert("address".into(), Value::Object(address));
        e
    };
    let echo = echo_of(&echo, &dropped_key);
    answer(
        &server,
        &dropped_key,
        vec![ResponseTemplate::new(200).set_body_json(echo)],
    )
    .await;

    let email_only = json!({"customer_id": empty, "email": "ada@example.com"});
    let bare = json!({"id": empty, "email": "ada@example.com", "address": {}, "metadata": {}});
    answer(
        &server,
        &empty,
        vec![ResponseTemplate::new(200).set_body_json(bare)],
    )
    .await;

    let full = profile(&forgotten, 1);
    let mut second = echo_of(&full, &forgotten);
    second["address"].as_object_mut().unwrap().remove("city");
    answer(
        &server,
        &forgotten,
        vec![
            ResponseTemplate::new(200).set_body_json(echo_of(&full, &forgotten)),
            ResponseTemplate::new(200).set_body_json(second),
        ],
    )
    .await;

    insert(&db.pool, &[two_keys, email_only, full]).await;
    assert_eq!(run_once(&db, &api, &[]).await.synced, 3);
    let only_email = json!({"customer_id": forgotten, "email": "new@example.com"});
    insert(&db.pool, &[only_email]).await;
    assert_eq!(run_once(&db, &api, &[]).await.synced, 1);

    let response: Value = common::sync_state(&db.pool, &dropped_key, "response").await;
    assert_eq!(
        response["metadata"],
        json!({"version": 1}),
        "Imprint's metadata: {response}"
    );

    let response: Value = common::sync_state(&db.pool, &empty, "response").await;
    assert_eq!(
        response["metadata"],
        json!({}),
        "an empty metadata: {response}"
    );
    let address = response.get("address").and_then(Value::as_object);
    assert!(
        address.is_some_and(|a| a.values().all(Value::is_null)),
        "an empty address: {response}"
    );

    let response: Value = common::sync_state(&db.pool, &forgotten, "response").await;
    let accepted: Value = common::sync_state(&db.pool, &forgotten, "accepted").await;
    assert_eq!(accepted["city"], "Springfield");
    assert_eq!(
        response["address"].get("city"),
        Some(&Value::Null),
        "the city Imprint no longer holds must not read as the accepted one: {response}"
    );
}

/// The write-back's sync-state columns travel row for row with the outcomes (NULL for the
/// rows that are not synced): a batch mixing every disposition, with a synced row whose lease
/// was lost in the middle, writes each synced customer its own answer, and nothing at all
/// (no sync state either) for the row it no longer holds.
#[tokio::test]
async fn a_mixed_batch_writes_each_synced_row_its_own_state_and_nothing_for_a_lost_lease() {
    use imprint_sync::outbox::record::{Disposition, Record};
    let db = TestDb::new().await;
    let cs: Vec<String> = (0..6).map(|n| customer_id(18, n)).collect();
    let profiles: Vec<Value> = cs.iter().map(|c| profile(c, 1)).collect();
    let ids = insert(&db.pool, &profiles).await;
    let store = Store::new(db.pool.clone(), "mixed");
    let claim = store.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claim.rows.len(), 6);
    let lease = |i: usize| {
        claim
            .rows
            .iter()
            .find(|r| r.id == ids[i])
            .unwrap()
            .lease_expires_at
    };
    let synced = |i: usize, claim| Record {
        disposition: Disposition::Synced {
            imprint_updated_at: None,
            statuses: Some(format!(r#"{{"n": {i}}}"#)),
            response: Some(format!(r#"{{"n": {i}}}"#)),
            drift: Some(format!(r#"["n{i}"]"#)),
            accepted: format!(r#"{{"email": "c{i}"}}"#),
        },
        http_status: Some(200),
        error_code: None,
        error: None,
        ..common::refused(ids[i], &cs[i], claim)
    };
    let retry = Record {
        disposition: Disposition::Retry {
            delay: Duration::from_secs(30),
            counts: true,
        },
        http_status: None,
        error_code: Some("timeout".into()),
        error: Some("no answer".into()),
        hold: Some(Duration::from_secs(30)),
        ..common::refused(ids[1], &cs[1], lease(1))
    };
    let lost = lease(2).map(|t| t + chrono::Duration::seconds(1));
    let release = Record {
        disposition: Disposition::Release,
        http_status: None,
        error_code: None,
        error: None,
        ..common::refused(ids[4], &cs[4], lease(4))
    };
    let batch = [
        retry,
        synced(0, lease(0)),
        common::refused(ids[3], &cs[3], lease(3)),
        synced(2, lost),
        release,
        synced(5, lease(5)),
    ];
    let applied = store.record(&batch).await.unwrap();
    let mut applied: Vec<i64> = applied.iter().map(|a| a.id).collect();
    applied.sort_unstable();
    assert_eq!(applied, [ids[0], ids[1], ids[3], ids[4], ids[5]]);

    let states: Vec<(String, Value, Value, Value, Value, i64)> = sqlx::query_as(
        "SELECT customer_id, statuses, response, drift, accepted, last_synced_outbox_id
         FROM imprint_sync.customer_sync_state ORDER BY customer_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<(String, Value, Value, Value, Value, i64)> = [0, 5]
        .into_iter()
        .map(|i| {
            (
                cs[i].clone(),
                json!({"n": i}),
                json!({"n": i}),
                json!([format!("n{i}")]),
                json!({"email": format!("c{i}")}),
                ids[i],
            )
        })
        .collect();
    assert_eq!(
        states, expected,
        "only the applied synced rows, each its own"
    );

    let r = row(&db.pool, ids[2]).await;
    assert_eq!(
        r.sync_status, "in_flight",
        "the lost lease's row is untouched"
    );
    assert_eq!(row(&db.pool, ids[1]).await.sync_status, "pending");
    assert_eq!(row(&db.pool, ids[3]).await.sync_status, "failed");
    assert_eq!(row(&db.pool, ids[4]).await.sync_status, "pending");
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT customer_id FROM imprint_sync.customer_claims WHERE hold_until > now()
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        held,
        [cs[1].clone()],
        "the quiet period of the timed-out row only"
    );
}

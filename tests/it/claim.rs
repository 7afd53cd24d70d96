//! The claim's promises (issue 10 §1, §3, §4): a row that cannot be read fails alone, a
//! customer's pending rows merge per column, and no request carries a value older than one
//! already sent for that column — across locked rows, late commits and timeouts.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Daemon, TestDb, counts, customer_id, env_with, insert, row, run_once, sandbox};
use imprint_sync::outbox::store::Store;
use imprint_sync::sandbox::Faults;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const LEASE: Duration = Duration::from_secs(60);

async fn exec(db: &TestDb, statement: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn error_of(db: &TestDb, id: i64) -> (String, String, String) {
    let r = row(&db.pool, id).await;
    (
        r.sync_status,
        r.last_error_code.unwrap_or_default(),
        r.last_error.unwrap_or_default(),
    )
}

/// Peak resident memory (VmHWM, kB) of a live process.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// §1 and the acceptance: one `'infinity'` among 1,000 good rows, through the shipped
/// trigger: one row fails naming the column, 999 sync, the process never restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_timestamp_fails_alone_among_a_thousand_rows() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    exec(
        &db,
        "CREATE TABLE public.partner_customers (
             imprint_customer_id text, email text, account_created_at timestamptz);
         CREATE TRIGGER to_imprint AFTER INSERT OR UPDATE ON public.partner_customers
             FOR EACH ROW EXECUTE FUNCTION imprint_sync.enqueue_customer_change();
         INSERT INTO public.partner_customers
             SELECT upper(gen_random_uuid()::text), 'u' || g || '@example.com', now()
             FROM generate_series(1, 499) g;
         INSERT INTO public.partner_customers VALUES ('POISON-INF', 'p@example.com', 'infinity');
         INSERT INTO public.partner_customers
             SELECT upper(gen_random_uuid()::text), 'w' || g || '@example.com', now()
             FROM generate_series(1, 500) g;",
    )
    .await;

    let env = env_with(&db.url, &sandbox.base_url(), &[]);
    let mut run = Daemon::start(&["run", "--once"], &env);
    assert_eq!(run.exit_code(120).await, 1, "{}", run.stderr());

    let by_status = counts(&db.pool).await;
    assert_eq!(by_status.get("synced"), Some(&999), "{by_status:?}");
    assert_eq!(by_status.get("failed"), Some(&1), "{by_status:?}");
    let poison: i64 = sqlx::query_scalar(
        "SELECT id FROM imprint_sync.customer_outbox WHERE customer_id = 'POISON-INF'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (status, code, message) = error_of(&db, poison).await;
    assert_eq!(
        (status.as_str(), code.as_str()),
        ("failed", "invalid_profile")
    );
    assert!(message.contains("account_created_at"), "{message}");
    assert!(!run.stderr().contains("panicked"), "{}", run.stderr());
}

/// §1: `metadata` nested past any parser's limit, or holding a number no f64 holds, fails its
/// row alone (the claim is not "database unavailable" forever).
#[tokio::test]
async fn unreadable_metadata_fails_alone() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email, metadata)
         VALUES ('DEEP-1', 'a@example.com', jsonb_build_object('a', $1::jsonb)),
                ('HUGE-1', 'b@example.com', '{\"x\": 1e400}'),
                ('GOOD-1', 'c@example.com', '{\"x\": 1}')
         RETURNING id",
    )
    .bind(deep)
    .fetch_all(&db.pool)
    .await
    .unwrap();

    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        run_once(&db, &sandbox.base_url(), &[]),
    )
    .await
    .expect("run --once ends");

    assert_eq!((summary.synced, summary.failed), (1, 2));
    for id in &ids[..2] {
        let (status, code, message) = error_of(&db, *id).await;
        assert_eq!(
            (status.as_str(), code.as_str()),
            ("failed", "invalid_profile")
        );
        assert!(message.contains("metadata"), "{message}");
    }
    assert_eq!(row(&db.pool, ids[2]).await.sync_status, "synced");
}

/// §1 and the acceptance: 400 rows of a 1 MB `first_name` fail alone (naming the column) and
/// are never loaded: peak RSS of `run --once` stays within 64 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_values_are_never_loaded() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    // md5 chains, so TOAST cannot compress them away and the database really holds 400 MB.
    exec(
        &db,
        "INSERT INTO imprint_sync.customer_outbox (customer_id, first_name)
         SELECT upper(gen_random_uuid()::text),
                (SELECT string_agg(md5(g::text || '-' || i::text), '')
                   FROM generate_series(1, 32768) i)
         FROM generate_series(1, 400) g",
    )
    .await;

    let env = env_with(&db.url, &sandbox.base_url(), &[]);
    let mut run = Daemon::start(&["run", "--once"], &env);
    let pid = run.pid();
    let mut peak = 0;
    let code = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        match tokio::time::timeout(Duration::from_millis(20), run.exit_code(120)).await {
            Ok(code) => break code,
            Err(_) => continue,
        }
    };
    assert_eq!(code, 1, "{}", run.stderr());
    assert_eq!(counts(&db.pool).await.get("failed"), Some(&400));
    let message: String =
        sqlx::query_scalar("SELECT last_error FROM imprint_sync.customer_outbox LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(message.contains("first_name"), "{message}");
    eprintln!("peak RSS of run --once over 400 rows of 1 MB: {peak} kB");
    assert!(peak > 0 && peak <= 64 * 1024, "peak RSS {peak} kB");
}

/// §3: `(c, email)` then `(c, phone)`: one request carrying both; the older row records the
/// row that carried it.
#[tokio::test]
async fn partial_updates_merge_per_column() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(31, 1);
    let ids = insert(
        &db.pool,
        &[
            json!({"customer_id": c, "email": "new@example.com"}),
            json!({"customer_id": c, "phone": "+14155550199"}),
        ],
    )
    .await;

    run_once(&db, &sandbox.base_url(), &[]).await;

    let journal = sandbox.journal(&c);
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0]["email"], "new@example.com");
    assert_eq!(journal[0]["phone"], "+14155550199");
    let old = row(&db.pool, ids[0]).await;
    assert_eq!(
        (old.sync_status.as_str(), old.superseded_by),
        ("superseded", Some(ids[1]))
    );
    assert_eq!(row(&db.pool, ids[1]).await.sync_status, "synced");
}

/// §4, the deterministic reproduction: another session holds row 1 locked; the claim takes
/// row 2; row 2 fails; once row 1 is free, it must not be sent after row 2 (each of its
/// columns is older than a value already sent).
#[tokio::test]
async fn a_locked_older_row_is_never_sent_after_a_newer_one() {
    let db = TestDb::new().await;
    let c = customer_id(32, 1);
    let ids = insert(
        &db.pool,
        &[
            json!({"customer_id": c, "email": "v1@example.com", "phone": "+14155550101"}),
            json!({"customer_id": c, "email": "v2@example.com", "phone": "+14155550102"}),
        ],
    )
    .await;
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; SELECT 1 FROM imprint_sync.customer_outbox WHERE id = {} FOR UPDATE",
        ids[0]
    )))
    .execute(&mut other)
    .await
    .unwrap();

    let store = Store::new(db.pool.clone(), "repro");
    let first = store.claim(10, LEASE).await.unwrap();
    assert_eq!(first.rows.len(), 1);
    assert_eq!(first.rows[0].id, ids[1]);
    assert_eq!(row(&db.pool, ids[0]).await.sync_status, "pending");
    store
        .record(&[common::refused(ids[1], &c, first.rows[0].lease_expires_at)])
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();

    let second = store.claim(10, LEASE).await.unwrap();
    assert!(
        second.rows.is_empty(),
        "row 1 was claimed: {:?}",
        second.rows
    );
    let r = row(&db.pool, ids[0]).await;
    assert_eq!(
        (r.sync_status.as_str(), r.superseded_by),
        ("superseded", Some(ids[1]))
    );
}

/// §4: a row whose transaction commits after a newer row was sent sends only the columns no
/// newer sent row set (its e-mail change survives; its stale phone is never sent), and what
/// Imprint accepted is merged per column.
#[tokio::test]
async fn a_late_commit_sends_only_the_columns_no_newer_row_sent() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let c = customer_id(33, 1);
    let mut late = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut late).await.unwrap();
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email, phone)
         VALUES ($1, 'late@example.com', '+14155550101') RETURNING id",
    )
    .bind(&c)
    .fetch_one(&mut late)
    .await
    .unwrap();
    let newer = insert(
        &db.pool,
        &[json!({"customer_id": c, "phone": "+14155550102"})],
    )
    .await;
    assert!(newer[0] > late_id);
    run_once(&db, &sandbox.base_url(), &[]).await;
    sqlx::raw_sql("COMMIT").execute(&mut late).await.unwrap();

    run_once(&db, &sandbox.base_url(), &[]).await;

    let journal = sandbox.journal(&c);
    assert_eq!(journal.len(), 2, "{journal:?}");
    assert_eq!(journal[0]["phone"], "+14155550102");
    assert_eq!(journal[1]["email"], "late@example.com");
    assert!(journal[1].get("phone").is_none(), "a stale phone was sent");
    assert_eq!(row(&db.pool, late_id).await.sync_status, "synced");
    let accepted: Value = common::sync_state(&db.pool, &c, "accepted").await;
    assert_eq!(accepted["email"], "late@example.com");
    assert_eq!(accepted["phone"], "+14155550102");
}

/// §4: after a timeout the request may still be applied; nothing for that customer is sent
/// again before `api.timeout_ms` has passed (the retry would otherwise follow at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_timeout_the_customer_is_quiet_for_the_timeout() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let db = TestDb::new().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let c = customer_id(34, 1);
    let id = insert(
        &db.pool,
        &[json!({"customer_id": c, "email": "a@example.com"})],
    )
    .await[0];
    let api = url::Url::parse(&server.uri()).unwrap();
    let timeout_ms = 400;
    run_once(
        &db,
        &api,
        &[
            ("API__TIMEOUT_MS", &timeout_ms.to_string()),
            ("API__CONNECT_TIMEOUT_MS", "300"),
            ("SYNC__MAX_ATTEMPTS", "2"),
            ("SYNC__LEASE_MS", "6000"),
        ],
    )
    .await;

    let tries: Vec<(chrono::DateTime<chrono::Utc>, i32)> = sqlx::query_as(
        "SELECT started_at, duration_ms FROM imprint_sync.sync_attempts
         WHERE outbox_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(tries.len(), 2, "{tries:?}");
    let gap = (tries[1].0 - tries[0].0).num_milliseconds();
    assert!(
        gap >= i64::from(tries[0].1) + timeout_ms,
        "the retry started {gap} ms after the timed-out request began ({} ms on the wire)",
        tries[0].1
    );
}

/// §1's safety net: a row whose claims keep dying is set aside as `poison_row`; a row
/// claimed before without an outcome (a suspect) is claimed alone.
#[tokio::test]
async fn a_row_whose_claims_keep_dying_is_set_aside() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let rows: Vec<Value> = (1..=4)
        .map(|n| json!({"customer_id": customer_id(35, n), "email": format!("u{n}@example.com")}))
        .collect();
    let ids = insert(&db.pool, &rows).await;
    // Rows 1 and 2 were claimed before and their outcomes never came back.
    exec(
        &db,
        &format!(
            "UPDATE imprint_sync.customer_outbox SET claims = 1 WHERE id IN ({}, {})",
            ids[0], ids[1]
        ),
    )
    .await;
    let store = Store::new(db.pool.clone(), "suspects");
    let alone = store.claim_batch(10, LEASE, true).await.unwrap();
    assert_eq!(
        alone.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[0]]
    );
    assert!(alone.more);
    let others = store.claim_batch(10, LEASE, false).await.unwrap();
    assert_eq!(
        others.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[2], ids[3]]
    );

    // Row 2 dies once more... and a third time: set aside, the others sync.
    exec(
        &db,
        &format!(
            "UPDATE imprint_sync.customer_outbox SET claims = 3 WHERE id = {}",
            ids[1]
        ),
    )
    .await;
    exec(
        &db,
        "UPDATE imprint_sync.customer_outbox
         SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL
         WHERE sync_status = 'in_flight'",
    )
    .await;
    let summary = run_once(&db, &sandbox.base_url(), &[]).await;
    assert_eq!((summary.synced, summary.failed), (3, 1));
    let (status, code, message) = error_of(&db, ids[1]).await;
    assert_eq!((status.as_str(), code.as_str()), ("failed", "poison_row"));
    assert!(
        message.contains(&format!("outbox row {}", ids[1])),
        "{message}"
    );
    assert!(sandbox.journal(&customer_id(35, 2)).is_empty());
}

/// What a journal body sets, by column, as the outbox id encoded in the value.
fn sources(body: &Value) -> BTreeMap<&'static str, i64> {
    let mut out = BTreeMap::new();
    let id = |v: &Value, prefix: &str| {
        v.as_str()
            .and_then(|s| s.strip_prefix(prefix))
            .and_then(|s| s.split('@').next())
            .and_then(|s| s.parse::<i64>().ok())
    };
    if let Some(n) = id(&body["email"], "e") {
        out.insert("email", n);
    }
    if let Some(n) = id(&body["first_name"], "n") {
        out.insert("first_name", n);
    }
    if let Some(n) = id(&body["last_name"], "l") {
        out.insert("last_name", n);
    }
    out
}

/// The acceptance: three binaries, 15 % of answers 400, rows committing late; no request
/// carries, for any column, a value from a row older than one already sent for it (checked in
/// the sandbox's journal, where every value names its outbox row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_send_a_column_backwards() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults {
        latency_ms: 3,
        reject_rate: 0.15,
        ..Faults::default()
    })
    .await;
    let env = env_with(
        &db.url,
        &sandbox.base_url(),
        &[("SYNC__BATCH_SIZE", "20"), ("SYNC__POLL_INTERVAL_MS", "50")],
    );
    let mut replicas: Vec<Daemon> = (0..3).map(|_| Daemon::start(&["run"], &env)).collect();

    const CUSTOMERS: u32 = 40;
    let mut next_id: i64 = 1_000;
    let row_of = |id: i64, customer: u32| {
        // Each row sets some of the columns, each value naming the row.
        let mut r = json!({"id": id, "customer_id": customer_id(36, customer)});
        if id % 2 == 0 {
            r["email"] = json!(format!("e{id}@example.com"));
        }
        if id % 3 != 1 {
            r["first_name"] = json!(format!("n{id}"));
        }
        if id % 5 < 3 || r.get("email").is_none() {
            r["last_name"] = json!(format!("l{id}"));
        }
        r
    };
    for round in 0..8 {
        // A transaction that takes its ids now and commits after newer rows were sent.
        let mut late = PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut late).await.unwrap();
        let late_rows: Vec<Value> = (0..CUSTOMERS)
            .step_by(4)
            .map(|c| {
                next_id += 1;
                row_of(next_id, c)
            })
            .collect();
        sqlx::query(
            "INSERT INTO imprint_sync.customer_outbox OVERRIDING SYSTEM VALUE
             SELECT * FROM jsonb_populate_recordset(NULL::imprint_sync.customer_outbox, $1)",
        )
        .bind(Value::Array(late_rows))
        .execute(&mut late)
        .await
        .ok();
        let rows: Vec<Value> = (0..CUSTOMERS)
            .map(|c| {
                next_id += 1;
                row_of(next_id, c)
            })
            .collect();
        insert(&db.pool, &rows).await;
        tokio::time::sleep(Duration::from_millis(150 + 20 * round)).await;
        sqlx::raw_sql("COMMIT").execute(&mut late).await.unwrap();
    }
    common::eventually(60, "the outbox drains", || async {
        let by = counts(&db.pool).await;
        !by.contains_key("pending") && !by.contains_key("in_flight")
    })
    .await;
    for r in &mut replicas {
        r.signal("TERM");
        assert_eq!(r.exit_code(30).await, 0, "{}", r.stderr());
    }

    let mut violations = Vec::new();
    let mut requests = 0;
    for c in 0..CUSTOMERS {
        let mut sent: BTreeMap<&str, i64> = BTreeMap::new();
        for body in sandbox.journal(&customer_id(36, c)) {
            requests += 1;
            for (column, id) in sources(&body) {
                let mark = sent.entry(column).or_insert(id);
                if id < *mark {
                    violations.push(format!(
                        "customer {c}: {column} from row {id} after row {mark}"
                    ));
                }
                *mark = (*mark).max(id);
            }
        }
    }
    let stats = sandbox.stats();
    eprintln!("{requests} requests, answers {:?}", stats.by_status);
    assert!(stats.count(400) > 0, "no 400 was injected");
    assert!(
        violations.is_empty(),
        "{} violations: {violations:?}",
        violations.len()
    );
    assert_eq!(stats.max_concurrent_per_customer, 1, "G1");
}

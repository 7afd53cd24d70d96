//! An adversary's cases against the claim (issue 10 §3, §4): provenance of carried values,
//! and a customer's claim record that cannot be read.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

mod common;

use std::time::Duration;

use common::{TestDb, customer_id, insert, row};
use imprint_sync::outbox::record::{Disposition, Record};
use imprint_sync::outbox::store::Store;
use serde_json::json;
use sqlx::{Connection, PgConnection};

const LEASE: Duration = Duration::from_secs(60);

/// A retryable outcome (a 500), due again at once.
fn retry(id: i64, customer: &str, claim: Option<chrono::DateTime<chrono::Utc>>) -> Record {
    Record {
        disposition: Disposition::Retry {
            delay: Duration::ZERO,
            counts: true,
        },
        http_status: Some(500),
        error_code: Some("http_500".into()),
        error: Some("server error".into()),
        ..common::refused(id, customer, claim)
    }
}

/// Row 1 (e-mail A), row 2 (e-mail B) inserted in a transaction left open (it commits late:
/// the caller commits on the connection returned) and row 3 (phone), for customer `c`.
async fn late_between(db: &TestDb, c: &str) -> (PgConnection, i64, i64) {
    let first = insert(
        &db.pool,
        &[json!({"customer_id": c, "email": "a@example.com"})],
    )
    .await;
    let mut late = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut late).await.unwrap();
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email)
         VALUES ($1, 'b@example.com') RETURNING id",
    )
    .bind(c)
    .fetch_one(&mut late)
    .await
    .unwrap();
    let newest = insert(
        &db.pool,
        &[json!({"customer_id": c, "phone": "+14155550103"})],
    )
    .await[0];
    assert!(first[0] < late_id && late_id < newest);
    (late, late_id, newest)
}

/// §3/§4: a value carried from an older row keeps that row's age. Rows 1 (e-mail A) and 3
/// (phone) merge into row 3, whose request fails with a 500; row 2 (e-mail B) commits late.
/// B is newer than A and A's request never got through: the retry must carry B, else the
/// late e-mail change is lost (Imprint keeps A for good).
#[tokio::test]
async fn a_carried_value_keeps_the_age_of_its_row() {
    let db = TestDb::new().await;
    let c = customer_id(61, 1);
    let (mut late, _, newest) = late_between(&db, &c).await;

    let store = Store::new(db.pool.clone(), "prov");
    let claim = store.claim(10, LEASE).await.unwrap();
    assert_eq!(claim.rows.len(), 1);
    assert_eq!(claim.rows[0].email.as_deref(), Some("a@example.com"));
    store
        .record(&[retry(newest, &c, claim.rows[0].lease_expires_at)])
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut late).await.unwrap();

    let again = store.claim(10, LEASE).await.unwrap();
    assert_eq!(again.rows.len(), 1, "{again:?}");
    assert_eq!(again.rows[0].id, newest);
    assert_eq!(
        again.rows[0].email.as_deref(),
        Some("b@example.com"),
        "the late, newer e-mail change was lost to the older one carried by the retry"
    );
    assert_eq!(again.rows[0].phone.as_deref(), Some("+14155550103"));
}

/// §4 and replay: row 3 carried row 1's e-mail A and failed (400); a late row 2 with e-mail B
/// was then sent. Replaying row 3 must not send A again: A is older than B, already sent.
#[tokio::test]
async fn a_replayed_carrier_never_sends_a_carried_value_backwards() {
    let db = TestDb::new().await;
    let c = customer_id(62, 1);
    let (mut late, late_id, newest) = late_between(&db, &c).await;

    let store = Store::new(db.pool.clone(), "replay");
    let claim = store.claim(10, LEASE).await.unwrap();
    assert_eq!(claim.rows[0].email.as_deref(), Some("a@example.com"));
    store
        .record(&[common::refused(newest, &c, claim.rows[0].lease_expires_at)])
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut late).await.unwrap();
    let late_claim = store.claim(10, LEASE).await.unwrap();
    assert_eq!(late_claim.rows.len(), 1);
    assert_eq!(late_claim.rows[0].id, late_id);
    assert_eq!(late_claim.rows[0].email.as_deref(), Some("b@example.com"));
    store
        .record(&[common::refused(
            late_id,
            &c,
            late_claim.rows[0].lease_expires_at,
        )])
        .await
        .unwrap();

    store.replay_failed(&Default::default()).await.unwrap();
    let replayed = store.claim(10, LEASE).await.unwrap();
    assert_eq!(replayed.rows.len(), 1, "{replayed:?}");
    assert_eq!(
        replayed.rows[0].email.as_deref(),
        Some("b@example.com"),
        "e-mail A (row 1) sent again after B (row 2)"
    );
    assert_eq!(replayed.rows[0].phone.as_deref(), Some("+14155550103"));
}

/// A customer's claim record edited by hand into something unreadable (a mark that is not a
/// number, marks that are not an object) must not stop the claim for every customer: the
/// other customers are claimed, and the claim never errors.
#[tokio::test]
async fn unreadable_marks_do_not_wedge_the_claim() {
    let db = TestDb::new().await;
    let bad: Vec<String> = (1..=4).map(|n| customer_id(63, n)).collect();
    let good = customer_id(64, 1);
    let mut rows: Vec<_> = bad
        .iter()
        .map(|c| json!({"customer_id": c, "email": "x@example.com"}))
        .collect();
    rows.push(json!({"customer_id": good, "email": "g@example.com"}));
    insert(&db.pool, &rows).await;
    for (c, marks) in bad.iter().zip([
        r#"{"email": "garbage"}"#,
        r#"{"email": 1.5e30}"#,
        r#"[1, 2]"#,
        r#""text""#,
    ]) {
        sqlx::query(
            "INSERT INTO imprint_sync.customer_claims (customer_id, marks) VALUES ($1, $2::jsonb)",
        )
        .bind(c)
        .bind(marks)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let store = Store::new(db.pool.clone(), "garbage");
    let claim = store.claim(10, LEASE).await.expect("the claim goes on");
    let claimed: Vec<&str> = claim.rows.iter().map(|r| r.customer_id.as_str()).collect();
    assert!(claimed.contains(&good.as_str()), "{claimed:?}");
    // And the claim record is readable again afterwards.
    for c in &bad {
        let marks: serde_json::Value = sqlx::query_scalar(
            "SELECT marks FROM imprint_sync.customer_claims WHERE customer_id = $1",
        )
        .bind(c)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(marks.is_object(), "{c}: {marks}");
    }
}

/// G7/G9: many pending rows of one customer, each with a megabyte value, are merged without
/// loading every value: once more than 1 GB of one column was aggregated into an array, the
/// claim failed for every customer, forever. The newest value (too large) fails its row
/// naming the column; the other customer is claimed.
#[tokio::test]
async fn a_customer_with_a_gigabyte_of_pending_values_does_not_stop_the_claim() {
    let db = TestDb::new().await;
    let big = customer_id(65, 1);
    let good = customer_id(65, 2);
    insert(
        &db.pool,
        &[json!({"customer_id": good, "email": "g@example.com"})],
    )
    .await;
    // Compressible values: a few MB on disk, 1.1 GB once read back.
    sqlx::query(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, first_name)
         SELECT $1, repeat('x', 1000000) FROM generate_series(1, 1100)",
    )
    .bind(&big)
    .execute(&db.pool)
    .await
    .unwrap();

    let store = Store::new(db.pool.clone(), "gigabyte");
    let claim = store.claim(10, LEASE).await.expect("the claim goes on");
    assert_eq!(
        claim.rows.len(),
        2,
        "{:?}",
        claim
            .rows
            .iter()
            .map(|r| &r.customer_id)
            .collect::<Vec<_>>()
    );
    let carrier = claim.rows.iter().find(|r| r.customer_id == big).unwrap();
    assert_eq!(
        carrier.defect.as_ref().map(|d| d.column),
        Some("first_name")
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_outbox
         WHERE customer_id = $1 AND sync_status = 'pending'",
    )
    .bind(&big)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "every older row of the big customer was merged");
}

/// §1 (poison_row): a row whose claims kept dying must not escape the count because its
/// customer changed again. Row S died twice; a newer row N of the same customer merges S's
/// values (the poison, maybe) into itself: N is as suspect as S (never in a batch), and once
/// S's claims reach `sync.max_claims` the merged row is set aside instead of sent.
#[tokio::test]
async fn a_newer_row_does_not_launder_a_suspect_one() {
    let db = TestDb::new().await;
    let c = customer_id(66, 1);
    let other = customer_id(66, 2);
    let suspect = insert(
        &db.pool,
        &[json!({"customer_id": c, "email": "s@example.com"})],
    )
    .await;
    sqlx::query("UPDATE imprint_sync.customer_outbox SET claims = 2 WHERE id = $1")
        .bind(suspect[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let newer = insert(
        &db.pool,
        &[
            json!({"customer_id": c, "phone": "+14155550103"}),
            json!({"customer_id": other, "email": "o@example.com"}),
        ],
    )
    .await;

    let store = Store::new(db.pool.clone(), "launder");
    // With other rows in hand, a suspect customer is not taken.
    let batch = store.claim_batch(10, LEASE, false).await.unwrap();
    let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(ids, [newer[1]], "a suspect customer was claimed in a batch");

    // Taken alone, the merged row dies once more (the lease runs out): S's two deaths and
    // this one make three, and the merged row is set aside instead of sent again.
    let alone = store.claim_batch(10, LEASE, true).await.unwrap();
    assert_eq!(
        alone.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [newer[0]]
    );
    sqlx::query(
        "UPDATE imprint_sync.customer_outbox
         SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL
         WHERE id = $1",
    )
    .bind(newer[0])
    .execute(&db.pool)
    .await
    .unwrap();
    let again = store.claim_batch(10, LEASE, true).await.unwrap();
    assert!(again.rows.is_empty(), "{:?}", again.rows);
    let r = row(&db.pool, newer[0]).await;
    assert_eq!(
        (r.sync_status.as_str(), r.last_error_code.as_deref()),
        ("failed", Some("poison_row"))
    );
}

/// G7: hostile rows, each failing alone naming what is wrong, while the good rows beside them
/// sync: timestamps at the type's ends, metadata that is not an object, every text column a
/// megabyte at once, customer ids that are huge, empty, multi-line or an e-mail, odd unicode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_fail_alone() {
    let db = TestDb::new().await;
    let sandbox = common::sandbox(imprint_sync::sandbox::Faults::default()).await;
    let texts = [
        "email",
        "phone",
        "first_name",
        "last_name",
        "preferred_language",
        "street_line1",
        "street_line2",
        "city",
        "state",
        "postal_code",
        "country",
        "ltv_currency",
        "loyalty_tier",
    ];
    let megabyte_everywhere = format!(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, {cols})
         SELECT '{id}', {vals}",
        cols = texts.join(", "),
        id = customer_id(67, 1),
        vals = texts
            .iter()
            .map(|_| "repeat('é', 600000)")
            .collect::<Vec<_>>()
            .join(", ")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(megabyte_everywhere))
        .execute(&db.pool)
        .await
        .unwrap();
    let hostile: Vec<(String, &str)> = vec![
        (customer_id(67, 2), "account_created_at = '-infinity'"),
        (customer_id(67, 3), "account_created_at = '294276-01-01'"),
        (customer_id(67, 4), "metadata = '[1, 2]'"),
        (customer_id(67, 5), "metadata = '\"text\"'"),
        (customer_id(67, 6), "metadata = 'null'"),
        (
            customer_id(67, 7),
            "first_name = E'\\u202Eevil\\u0007\\uFEFF'",
        ),
        (
            customer_id(67, 8),
            "account_tenure = 2147483647, ltv_amount = -9223372036854775808",
        ),
        ("x".repeat(100_000), "email = 'a@example.com'"),
        (String::new(), "email = 'b@example.com'"),
        ("A\nB".to_owned(), "email = 'c@example.com'"),
        ("ada@example.com".to_owned(), "email = 'd@example.com'"),
    ];
    let mut ids = Vec::new();
    for (c, set) in &hostile {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO imprint_sync.customer_outbox (customer_id, email) VALUES ($1, 'h@example.com')
             RETURNING id",
        )
        .bind(c)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "UPDATE imprint_sync.customer_outbox SET {set} WHERE id = {id}"
        )))
        .execute(&db.pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let good: Vec<_> = (1..=20)
        .map(|n| common::profile(&customer_id(68, n), 1))
        .collect();
    insert(&db.pool, &good).await;

    let summary = common::run_once(&db, &sandbox.base_url(), &[]).await;
    assert_eq!(summary.synced, 20, "{summary:?}");
    let failed: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, sync_status, last_error FROM imprint_sync.customer_outbox
         WHERE customer_id NOT LIKE '00000044-%' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (id, status, error) in &failed {
        assert_eq!(status, "failed", "row {id}: {error:?}");
        let error = error.as_deref().unwrap_or_default();
        assert!(
            error.len() < 2_000,
            "row {id}: an error of {} bytes",
            error.len()
        );
        assert!(!error.contains("ada@example.com"), "row {id}: {error}");
    }
    assert_eq!(failed.len(), 12, "{failed:?}");
}

//! G9: the claim's work is bounded by the batch, whatever the backlog, the synced history or
//! the planner's statistics. Each case seeds the outbox the way a partner would (random
//! upper-case UUIDs, no `ANALYZE` after the seed unless the case says so), runs one claim with
//! every statement under `EXPLAIN (ANALYZE, FORMAT JSON)`, and holds the plans' work (rows
//! produced and removed by filters, times loops: `outbox::plan::work`) per claimed row to 50.
//! Deterministic: rows counted, never time.

use crate::common;

use std::time::Duration;

use common::TestDb;
use imprint_sync::outbox::store::Store;

/// The claims' limit, as `sync.batch_size` ships.
const BATCH: u32 = 500;
/// The bound of issue 11: work per claimed row.
const MAX_WORK_PER_ROW: f64 = 50.0;

/// The cases seed up to 1.1 M rows: one at a time, so they do not fight for the CI's cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sql(db: &TestDb, statement: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// `n` rows of fresh customers (one row each) in `status`; minimal columns.
fn rows(n: u32, status: &str) -> String {
    format!(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email, sync_status)
         SELECT upper(gen_random_uuid()::text), 'x', '{status}' FROM generate_series(1, {n})"
    )
}

/// One measured claim; asserts it claimed a full batch within the bound and returns the work
/// per claimed row.
async fn measured_claim(db: &TestDb, case: &str) -> f64 {
    let store = Store::new(db.pool.clone(), "plan-test");
    let (claim, work) = store
        .claim_measured(BATCH, Duration::from_secs(60))
        .await
        .expect("claim");
    let claimed = claim.rows.len();
    let per_row = work / claimed.max(1) as f64;
    eprintln!("{case}: {claimed} rows claimed, plan work {work}, {per_row:.1} per claimed row");
    assert_eq!(claimed, BATCH as usize, "{case}: the batch was not filled");
    assert!(
        per_row <= MAX_WORK_PER_ROW,
        "{case}: claim work {per_row:.1} per claimed row (limit {MAX_WORK_PER_ROW})"
    );
    per_row
}

#[tokio::test]
async fn claim_work_is_bounded_on_a_fresh_never_analyzed_table() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    sql(&db, &rows(100_000, "pending")).await;
    measured_claim(&db, "100,000 pending, never analyzed").await;
}

#[tokio::test]
async fn claim_work_is_bounded_after_a_bulk_import_into_a_long_history() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    sql(&db, &rows(1_000_000, "synced")).await;
    sql(&db, "ANALYZE imprint_sync.customer_outbox").await;
    sql(&db, &rows(100_000, "pending")).await;
    measured_claim(&db, "1,000,000 synced (analyzed) + 100,000 pending").await;
}

#[tokio::test]
async fn claim_work_is_bounded_when_customers_have_many_pending_versions() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    // Versions arrive over time: every customer's first change, then every second one, ...
    // Each sets five columns, and each customer was synced before (its marks are set), so
    // every column's merge consults them.
    sql(
        &db,
        "INSERT INTO imprint_sync.customer_outbox
             (customer_id, email, phone, first_name, last_name, city)
         SELECT c.id, 'v' || v, 'p' || v, 'f' || v, 'l' || v, 'c' || v
         FROM (SELECT upper(gen_random_uuid()::text) AS id FROM generate_series(1, 20000)) c,
              generate_series(1, 5) v
         ORDER BY v;
         INSERT INTO imprint_sync.customer_claims (customer_id, marks)
         SELECT DISTINCT customer_id,
                '{\"email\": 1, \"phone\": 1, \"first_name\": 1, \"last_name\": 1, \"city\": 1}'::jsonb
         FROM imprint_sync.customer_outbox;",
    )
    .await;
    measured_claim(&db, "20,000 customers x 5 pending versions").await;
}

#[tokio::test]
async fn claim_work_is_bounded_when_customers_in_flight_have_newer_rows() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    // 1,000 customers with a row in flight elsewhere and a newer row pending, ahead of
    // everyone else in due order; then 10,000 customers the claim can take.
    sql(
        &db,
        "CREATE TEMP TABLE busy AS SELECT upper(gen_random_uuid()::text) AS id
             FROM generate_series(1, 1000);
         INSERT INTO imprint_sync.customer_outbox
             (customer_id, email, sync_status, leased_by, lease_expires_at)
         SELECT id, 'old', 'in_flight', 'elsewhere', now() + interval '1 hour' FROM busy;
         INSERT INTO imprint_sync.customer_outbox (customer_id, email)
         SELECT id, 'new' FROM busy;",
    )
    .await;
    sql(&db, &rows(10_000, "pending")).await;
    measured_claim(&db, "1,000 customers in flight with newer rows pending").await;
}

/// WAL record bytes (full-page images left out: they depend on when the last checkpoint was)
/// of this database's transactions since `from`, and the synced rows.
async fn wal_since(db: &TestDb, from: &str) -> i64 {
    sqlx::query_scalar(
        r"SELECT COALESCE(sum(record_length - fpi_length), 0)::int8
          FROM pg_get_wal_records_info($1::pg_lsn, pg_current_wal_lsn())
          WHERE xid::text::bigint <> 0
            AND (regexp_match(block_ref, 'rel \d+/(\d+)/'))[1]::oid
                = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(from)
    .fetch_one(&db.pool)
    .await
    .expect("reading the WAL")
}

/// G9, the write-back's cost: a synced row (a full profile, claimed, sent, written back with
/// its sync state and attempt) writes at most `MAX_WAL_PER_ROW` bytes of WAL records on the
/// partner's database, full-page images aside. Deterministic: bytes, never time.
#[tokio::test]
async fn a_synced_row_writes_little_wal() {
    /// Measured: 4,153 B before the cut of issue 11 (fillfactor 100, `origins` written
    /// whole), 3,202 B after.
    const MAX_WAL_PER_ROW: i64 = 3_400;
    const CUSTOMERS: u32 = 300;
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    sql(
        &db,
        "CREATE EXTENSION IF NOT EXISTS pg_walinspect;
         ALTER TABLE imprint_sync.customer_outbox SET (autovacuum_enabled = false);
         ALTER TABLE imprint_sync.customer_claims SET (autovacuum_enabled = false);
         ALTER TABLE imprint_sync.customer_sync_state SET (autovacuum_enabled = false);
         ALTER TABLE imprint_sync.sync_attempts SET (autovacuum_enabled = false);",
    )
    .await;
    common::seed_customers(&db.pool, 11, CUSTOMERS).await;
    let sandbox = common::sandbox(imprint_sync::sandbox::Faults::default()).await;
    let from: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .expect("lsn");
    common::run_once(&db, &sandbox.base_url(), &[]).await;
    let wal = wal_since(&db, &from).await;
    let counts = common::counts(&db.pool).await;
    assert_eq!(counts["synced"], i64::from(CUSTOMERS), "{counts:?}");
    let per_row = wal / i64::from(CUSTOMERS);
    eprintln!("WAL per synced row, full-page images aside: {per_row} B ({wal} B in all)");
    assert!(
        per_row <= MAX_WAL_PER_ROW,
        "{per_row} B of WAL per synced row (limit {MAX_WAL_PER_ROW})"
    );
}

//! The schema as partners and operators meet it: `imprint-sync migrate`, the outbox's
//! constraints, the ready trigger function, and the NOTIFY that wakes the daemon.

use crate::common;

use std::time::Duration;

use common::{TestDb, binary_command, output_text, run_binary};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

const TABLES: [&str; 6] = [
    "customer_claims",
    "customer_outbox",
    "customer_sync_state",
    "reconcile_runs",
    "sync_attempts",
    "workers",
];

async fn our_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'imprint_sync' AND table_name NOT LIKE '\\_sqlx%'
          ORDER BY table_name",
    )
    .fetch_all(pool)
    .await
    .expect("listing tables")
}

async fn applied_migrations(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM imprint_sync._sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .expect("counting applied migrations")
}

async fn assert_fully_migrated(db: &TestDb) {
    assert_eq!(our_tables(&db.pool).await, TABLES);
    let embedded = imprint_sync::db::migrator().iter().count() as i64;
    assert_eq!(applied_migrations(&db.pool).await, embedded);
}

fn migrate(db: &TestDb) -> std::process::Output {
    run_binary(&["migrate"], &[("DATABASE_URL", &db.url)])
}

#[tokio::test]
async fn migrate_creates_the_tables_and_is_idempotent() {
    let db = TestDb::empty().await;
    assert!(our_tables(&db.pool).await.is_empty());
    for run in ["first", "second"] {
        let out = migrate(&db);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{run} run: {}",
            output_text(&out)
        );
        assert_fully_migrated(&db).await;
    }
}

#[tokio::test]
async fn two_replicas_may_migrate_at_once() {
    let db = TestDb::empty().await;
    let children: Vec<_> = (0..2)
        .map(|_| {
            binary_command(&["migrate"], &[("DATABASE_URL", &db.url)])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawning imprint-sync migrate")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("waiting for migrate");
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    }
    assert_fully_migrated(&db).await;
}

#[tokio::test]
async fn any_content_is_accepted_and_starts_pending() {
    let db = TestDb::new().await;
    let (status, attempts): (String, i32) = sqlx::query_as(
        "INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('X')
         RETURNING sync_status, attempts",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the smallest insert");
    assert_eq!((status.as_str(), attempts), ("pending", 0));

    // Bad values are the engine's to reject row by row; the partner's write never fails.
    sqlx::query(
        "INSERT INTO imprint_sync.customer_outbox
             (customer_id, email, phone, country, account_tenure, ltv_amount, metadata)
         VALUES ('X', 'not-an-email', '+0123', 'ZZZZ', -3, -1, '[1,2]')",
    )
    .execute(&db.pool)
    .await
    .expect("an insert with garbage content");
}

/// What migration 0007 stores for a 100 KB id of 'x': a short marker the daemon refuses.
async fn oversized_marker(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT 'oversized:' || md5(repeat('x', 100000)) || ':100000'")
        .fetch_one(pool)
        .await
        .expect("computing the marker")
}

/// G7: a customer_id far past the btree limit (~2.7 KB) is stored, under a bounded marker.
#[tokio::test]
async fn an_oversized_customer_id_is_stored_under_a_marker() {
    let db = TestDb::new().await;
    let stored: String = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email)
         VALUES (repeat('x', 100000), 'a@example.com'),
                (repeat('y', 255), NULL)
         RETURNING customer_id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("an insert with a 100 KB customer_id");
    assert_eq!(stored, oversized_marker(&db.pool).await);
    assert!(stored.starts_with("oversized:") && stored.len() < 64);
    assert!(imprint_sync::profile::check_customer_id(&stored).is_err());
    // 255 bytes is kept as it is (and refused by the daemon, naming its length).
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imprint_sync.customer_outbox WHERE customer_id = repeat('y', 255)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, 1);
}

/// G7 through the ready trigger: the partner's own write is not cancelled.
#[tokio::test]
async fn an_oversized_id_through_the_trigger_keeps_the_partners_write() {
    let db = with_partner_table("AFTER INSERT OR UPDATE").await;
    exec(
        &db.pool,
        "INSERT INTO customers (imprint_customer_id, email) VALUES (repeat('x', 100000), 'z@example.com')",
    )
    .await;
    assert_eq!(count(&db.pool, "customers").await, 3);
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT customer_id FROM imprint_sync.customer_outbox")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(ids, [oversized_marker(&db.pool).await]);
}

async fn insert_error_code(pool: &PgPool, sql: String) -> String {
    let err = sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect_err("the insert should be refused");
    err.as_database_error()
        .and_then(|e| e.code())
        .expect("a database error with a SQLSTATE")
        .into_owned()
}

#[tokio::test]
async fn sync_status_is_checked() {
    let db = TestDb::new().await;
    let code = insert_error_code(
        &db.pool,
        "INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status) VALUES ('X', 'done')"
            .to_owned(),
    )
    .await;
    assert_eq!(code, "23514", "check_violation");
}

#[tokio::test]
async fn at_most_one_row_per_customer_is_in_flight() {
    let db = TestDb::new().await;
    let in_flight = |customer: &str| {
        format!(
            "INSERT INTO imprint_sync.customer_outbox
                 (customer_id, sync_status, lease_expires_at, leased_by)
             VALUES ('{customer}', 'in_flight', now() + interval '1 minute', 'w1')"
        )
    };
    for sql in [in_flight("A"), in_flight("B")] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .expect("one in-flight row per customer is fine");
    }
    let code = insert_error_code(&db.pool, in_flight("A")).await;
    assert_eq!(code, "23505", "unique_violation");
}

/// A fresh database with a partner's own table, the ready trigger attached the way the
/// README shows, one linked and one unlinked customer, and an empty outbox.
async fn with_partner_table(trigger: &str) -> TestDb {
    let db = TestDb::new().await;
    let ddl = format!(
        "CREATE TABLE customers (
             id serial PRIMARY KEY, imprint_customer_id text, email text, phone text,
             first_name text, state text, country text, account_tenure int, metadata jsonb,
             unrelated text);
         CREATE TRIGGER customers_to_imprint {trigger} ON customers
             FOR EACH ROW EXECUTE FUNCTION imprint_sync.enqueue_customer_change();
         INSERT INTO customers (imprint_customer_id, email, phone, first_name, state, country,
                                account_tenure, metadata, unrelated)
         VALUES ('cust-1', 'old@example.com', '+14155550100', 'Ada', 'CA', 'USA', 3,
                 '{{\"tier\": \"gold\"}}', 'x'),
                (NULL, 'unlinked@example.com', NULL, 'Bob', NULL, NULL, NULL, NULL, 'x');
         DELETE FROM imprint_sync.customer_outbox;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&db.pool)
        .await
        .expect("creating the partner table");
    db
}

async fn exec(pool: &PgPool, sql: &'static str) {
    sqlx::raw_sql(sql).execute(pool).await.expect(sql);
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("counting rows")
}

async fn outbox_count(pool: &PgPool) -> i64 {
    count(pool, "imprint_sync.customer_outbox").await
}

/// Runs the partner's statement; returns how many outbox rows there are then.
async fn outbox_rows_after(pool: &PgPool, sql: &'static str) -> i64 {
    exec(pool, sql).await;
    outbox_count(pool).await
}

type MappedRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<serde_json::Value>,
    String,
);

#[tokio::test]
async fn an_update_enqueues_one_row_with_the_mapped_columns() {
    let db = with_partner_table("AFTER INSERT OR UPDATE").await;
    exec(
        &db.pool,
        "UPDATE customers SET email = 'new@example.com' WHERE imprint_customer_id = 'cust-1'",
    )
    .await;

    let rows: Vec<MappedRow> = sqlx::query_as(
        "SELECT customer_id, email, phone, first_name, state, country, account_tenure,
                metadata, sync_status
           FROM imprint_sync.customer_outbox",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        rows,
        [(
            "cust-1".to_owned(),
            s("new@example.com"),
            s("+14155550100"),
            s("Ada"),
            s("CA"),
            s("USA"),
            Some(3),
            Some(serde_json::json!({"tier": "gold"})),
            "pending".to_owned(),
        )]
    );

    // Columns the partner's table lacks stay NULL: "leave unchanged".
    let absent: (Option<String>, Option<String>, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT last_name, street_line1, ltv_amount, postal_code FROM imprint_sync.customer_outbox",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(absent, (None, None, None, None));
}

#[tokio::test]
async fn an_update_of_unmapped_columns_enqueues_nothing() {
    let db = with_partner_table("AFTER INSERT OR UPDATE").await;
    let unmapped = "UPDATE customers SET unrelated = 'y'";
    assert_eq!(outbox_rows_after(&db.pool, unmapped).await, 0);
    // The same statement on a mapped column does enqueue: the zero above is not vacuous.
    let mapped = "UPDATE customers SET first_name = 'Ann' WHERE imprint_customer_id = 'cust-1'";
    assert_eq!(outbox_rows_after(&db.pool, mapped).await, 1);
}

#[tokio::test]
async fn rows_without_an_imprint_id_are_skipped() {
    let db = with_partner_table("AFTER INSERT OR UPDATE").await;
    let unlinked =
        "UPDATE customers SET email = 'still@example.com' WHERE imprint_customer_id IS NULL;
                    INSERT INTO customers (email) VALUES ('new-unlinked@example.com');";
    assert_eq!(outbox_rows_after(&db.pool, unlinked).await, 0);
}

#[tokio::test]
async fn attached_before_the_partners_write_survives() {
    let db = with_partner_table("BEFORE INSERT OR UPDATE").await;
    assert_eq!(
        count(&db.pool, "customers").await,
        2,
        "a BEFORE trigger must not cancel the partner's insert"
    );
    let update = "UPDATE customers SET email = 'b@example.com' WHERE id = 1";
    assert_eq!(outbox_rows_after(&db.pool, update).await, 1);
}

#[tokio::test]
async fn the_id_column_can_be_named_and_bad_numbers_become_null() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "CREATE TABLE members (member_no serial, imprint_uuid uuid, email text,
                               account_tenure text);
         CREATE TRIGGER members_to_imprint AFTER INSERT OR UPDATE ON members
             FOR EACH ROW EXECUTE FUNCTION imprint_sync.enqueue_customer_change('imprint_uuid');
         INSERT INTO members (imprint_uuid, email, account_tenure)
         VALUES ('6f1c1e36-5a3c-4a0c-9d51-3b1f0a6d2e11', 'm@example.com', 'many years');",
    )
    .await;
    let row: (String, Option<String>, Option<i32>) = sqlx::query_as(
        "SELECT customer_id, email, account_tenure FROM imprint_sync.customer_outbox",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "6f1c1e36-5a3c-4a0c-9d51-3b1f0a6d2e11".to_owned(),
            Some("m@example.com".to_owned()),
            None
        )
    );
}

#[tokio::test]
async fn a_thousand_row_insert_notifies_once() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen("imprint_sync_outbox").await.unwrap();

    exec(
        &db.pool,
        "INSERT INTO imprint_sync.customer_outbox (customer_id)
         SELECT 'c' || n FROM generate_series(1, 1000) AS n",
    )
    .await;
    assert_eq!(outbox_count(&db.pool).await, 1000);

    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no notification within 5 s")
        .unwrap();
    assert_eq!(first.channel(), "imprint_sync_outbox");
    let second = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(second.is_err(), "a second notification arrived: {second:?}");
}

/// An `in_flight` row without a lease could never be rescued: it blocked its customer and
/// `run --once` forever. Refused now, whoever inserts or updates it (issue 10, section 5).
#[tokio::test]
async fn an_in_flight_row_must_carry_a_lease() {
    let db = TestDb::new().await;
    for columns in [
        "(customer_id, sync_status) VALUES ('A', 'in_flight')",
        "(customer_id, sync_status, leased_by) VALUES ('A', 'in_flight', 'w1')",
        "(customer_id, sync_status, lease_expires_at) VALUES ('A', 'in_flight', now())",
    ] {
        let sql = format!("INSERT INTO imprint_sync.customer_outbox {columns}");
        let code = insert_error_code(&db.pool, sql).await;
        assert_eq!(code, "23514", "check_violation: {columns}");
    }
    sqlx::query("INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('B')")
        .execute(&db.pool)
        .await
        .unwrap();
    let code = insert_error_code(
        &db.pool,
        "UPDATE imprint_sync.customer_outbox SET sync_status = 'in_flight' WHERE customer_id = 'B'"
            .to_owned(),
    )
    .await;
    assert_eq!(code, "23514", "an update into in_flight without a lease");
}

/// An explicit id broke the order of changes or a later insert: `id` is GENERATED ALWAYS.
#[tokio::test]
async fn the_outbox_id_is_always_generated() {
    let db = TestDb::new().await;
    let code = insert_error_code(
        &db.pool,
        "INSERT INTO imprint_sync.customer_outbox (id, customer_id) VALUES (9223372036854775000, 'A')"
            .to_owned(),
    )
    .await;
    assert_eq!(code, "428C9", "generated_always");
    sqlx::query("INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('A')")
        .execute(&db.pool)
        .await
        .expect("an ordinary insert still works");
}

/// Upgrading a database whose outbox already holds rows a writer left in flight without a
/// lease: 0003 puts them back to pending and validates the check over every row.
#[tokio::test]
async fn migration_0003_rescues_lease_less_in_flight_rows_and_validates() {
    let db = TestDb::empty().await;
    let migrator = imprint_sync::db::migrator();
    migrator
        .run_to(2, &db.pool)
        .await
        .expect("migrations 1 and 2");
    sqlx::raw_sql(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, email) VALUES ('A', 'a@example.com');
         INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status) VALUES ('B', 'in_flight');
         INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status, leased_by)
              VALUES ('C', 'in_flight', 'w-gone');
         INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status, lease_expires_at, leased_by)
              VALUES ('D', 'in_flight', now() + interval '1 minute', 'w-live');
         INSERT INTO imprint_sync.customer_outbox (id, customer_id) VALUES (1000, 'E');",
    )
    .execute(&db.pool)
    .await
    .expect("rows the old schema allowed");

    let out = migrate(&db);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_fully_migrated(&db).await;

    let states: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT customer_id, sync_status, leased_by FROM imprint_sync.customer_outbox
          ORDER BY customer_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected = [
        ("A", "pending", None),
        ("B", "pending", None),
        ("C", "pending", None),
        ("D", "in_flight", Some("w-live")),
        ("E", "pending", None),
    ];
    let states: Vec<(&str, &str, Option<&str>)> = states
        .iter()
        .map(|(c, s, l)| (c.as_str(), s.as_str(), l.as_deref()))
        .collect();
    assert_eq!(states, expected);
    let validated: bool = sqlx::query_scalar(
        "SELECT convalidated FROM pg_constraint WHERE conname = 'customer_outbox_in_flight_has_lease'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(validated, "the check is validated over the existing rows");
    // The explicit id 1000 no longer lies ahead of the sequence.
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('F') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("an ordinary insert after an explicit id");
    assert!(
        next > 1000,
        "the sequence moved past the explicit ids: {next}"
    );
    // Running it all again changes nothing.
    let out = migrate(&db);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
}

/// `migrate` waiting for a lock must not stop the partner's writes. 0003's ALTER TABLE needs
/// an exclusive lock; behind a partner transaction left open, it used to wait for ever, and
/// every later insert into the outbox queued behind it (the partner's writes stalled for as
/// long as that transaction lived). Now it gives up the lock request within seconds and
/// tries again, so inserts go on; it finishes once the transaction ends (adversarial review).
#[tokio::test]
async fn migrate_waiting_for_a_lock_never_stalls_the_partners_inserts() {
    let db = TestDb::empty().await;
    imprint_sync::db::migrator()
        .run_to(2, &db.pool)
        .await
        .expect("migrations 1 and 2");
    let mut open = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('held')")
        .execute(&mut *open)
        .await
        .unwrap();

    let child = binary_command(&["migrate"], &[("DATABASE_URL", &db.url)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until migrate's ALTER TABLE waits on the lock the open transaction holds.
    let mut waited = false;
    for _ in 0..300 {
        waited = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND wait_event_type = 'Lock'
                               AND query ILIKE '%GENERATED ALWAYS%')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        waited,
        "migrate never waited on the open transaction's lock"
    );

    // A partner insert meanwhile: it may wait a moment, never for the open transaction.
    let mut partner = db.pool.acquire().await.unwrap();
    sqlx::query("SET lock_timeout = '15s'")
        .execute(&mut *partner)
        .await
        .unwrap();
    let insert =
        sqlx::query("INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('meanwhile')")
            .execute(&mut *partner)
            .await;
    drop(partner);
    open.commit().await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    insert.expect("a partner insert while migrate waits for its lock");
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_fully_migrated(&db).await;
}

/// The checksum (SHA-384 of the file's bytes) of every migration as it first landed on main:
/// `migrate` fails on every database that applied a migration whose bytes changed since
/// ("previously applied but has been modified"), so none may change (CONTRIBUTING.md, "Never
/// edit an applied migration"). A new migration adds its line here when it lands.
const LANDED: [(i64, &str); 11] = [
    (
        1,
        "4a17adc5edefcb93a88aff115952b99a583350c73268ec11ee9db63b6f78388db6d83b750a83b6746fb00457a58e2c9a",
    ),
    (
        2,
        "f54f71a63b0d2cd57e2dcf2b2cf64733d5321735a90b8ab8b2f1acff40971509bcf3ade730a223d0c1de2084bd587773",
    ),
    (
        3,
        "7c8c5f4e5a72768cab83563f9a513a301298eb5647c7f950d363612e9b578d15ed0d3f96dbec7f07f58bb4e4c92b0abf",
    ),
    (
        4,
        "a29d52620818f23f48f69b333675b9e25b994c476431cba9ce0a2c936af31f79aa584b6cf282dbeaea005800601035f9",
    ),
    (
        5,
        "ff148e925ff1dc80fe1a4ae73a6808a03aa142ed4e4380365c978ff074f3428b4b6e45e4618a1d68e7e4c28acb6a0a5b",
    ),
    (
        6,
        "2f50aae9947dca8c154317301bf83adf27c9acd64bdd4155a1521f009bafa63b7a1fadd5648db4f3cd59ee41125133a1",
    ),
    (
        7,
        "de098a01c1c28120d15b071a3f40570bb681a33a4795bf797a969ce4bf403d63f7c0876a2619226b4e023ec5676ac624",
    ),
    (
        8,
        "3e21552c349a8f862a87878d4e2ced5ef2bbf9fe015485e1984ae5f0073692a93da63adb76b0304bc349a193a0fc1bc7",
    ),
    (
        9,
        "7aefbf5042bff537cf78a7df017dd863a6f205a301889b953e3a9a64202f7ec26cc690efe1644eba703914c2d24bca01",
    ),
    (
        10,
        "1c2abbaebd27516a6b285d54cef6968bbb96615dae7fc5aba53edc8ed62b7d1c9c0b53c7bc33cc20eaa888d744cd96d7",
    ),
    (
        11,
        "dc074e3a02a2edaaefac480039de29abdaf33d8250c3f0a1f49cd31bcfedefd4ca77ea89421aa8cf699d04392890aae3",
    ),
];

/// 0009's comment was reworded after it had landed (adversarial review): every database
/// migrated in between then failed `migrate`.
#[test]
fn no_migration_that_landed_is_ever_edited() {
    let embedded: Vec<(i64, String)> = imprint_sync::db::migrator()
        .iter()
        .map(|m| {
            let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
            (m.version, hex)
        })
        .collect();
    for (version, landed) in LANDED {
        let now = embedded
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, hex)| hex.as_str());
        assert_eq!(
            now,
            Some(landed),
            "migration {version} changed since it landed"
        );
    }
    assert_eq!(
        embedded.len(),
        LANDED.len(),
        "a new migration adds its checksum to LANDED"
    );
}

/// 0010 keeps an index made beforehand under its name (a DBA's `CREATE INDEX CONCURRENTLY`,
/// to spare the partner's inserts the wait) and drops the index of every row. An index made
/// with another definition (only `'synced'` in the predicate, other columns) was kept as it
/// was: `history` then scanned the whole outbox for a customer's settled rows. 0011 builds
/// such an index again as defined; one made as defined is left alone, and an invalid one (a
/// concurrent build given up) is valid after `migrate` (adversarial review).
#[tokio::test]
async fn a_settled_index_made_beforehand_is_kept_only_as_defined() {
    const DEFINED: &str = "CREATE INDEX customer_outbox_settled_customer_idx \
        ON imprint_sync.customer_outbox USING btree (customer_id, id) \
        WHERE (sync_status = ANY (ARRAY['synced'::text, 'superseded'::text]))";
    let made = |def: &str| {
        format!(
            "CREATE INDEX customer_outbox_settled_customer_idx ON imprint_sync.customer_outbox {def}"
        )
    };
    for (case, sql, kept) in [
        (
            "as defined",
            made("(customer_id, id) WHERE sync_status IN ('synced', 'superseded')"),
            true,
        ),
        (
            "only synced",
            made("(customer_id, id) WHERE sync_status = 'synced'"),
            false,
        ),
        ("other columns", made("(id)"), false),
        (
            "invalid",
            made(
                "(customer_id, id) WHERE sync_status IN ('synced', 'superseded');
                  UPDATE pg_index SET indisvalid = false
                  WHERE indexrelid = 'imprint_sync.customer_outbox_settled_customer_idx'::regclass",
            ),
            false,
        ),
    ] {
        let db = TestDb::empty().await;
        imprint_sync::db::migrator()
            .run_to(9, &db.pool)
            .await
            .expect("migrations 1 to 9");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .expect(case);
        let oid = "SELECT 'imprint_sync.customer_outbox_settled_customer_idx'::regclass::oid::int8";
        let before: i64 = sqlx::query_scalar(oid).fetch_one(&db.pool).await.unwrap();
        let out = migrate(&db);
        assert_eq!(out.status.code(), Some(0), "{case}: {}", output_text(&out));
        assert_fully_migrated(&db).await;
        let (def, valid, after): (String, bool, i64) = sqlx::query_as(
            "SELECT pg_get_indexdef(indexrelid), indisvalid, indexrelid::oid::int8 FROM pg_index
             WHERE indexrelid = 'imprint_sync.customer_outbox_settled_customer_idx'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(def, DEFINED, "{case}");
        assert!(valid, "{case}: valid");
        if kept {
            assert_eq!(after, before, "{case}: not built again");
        }
        let retention: String = sqlx::query_scalar(
            "SELECT pg_get_indexdef('imprint_sync.customer_outbox_finished_idx'::regclass)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            retention,
            "CREATE INDEX customer_outbox_finished_idx ON imprint_sync.customer_outbox \
             USING btree (updated_at) WHERE ((sync_status = ANY \
             (ARRAY['synced'::text, 'superseded'::text])) AND (updated_at IS NOT NULL))",
            "{case}: retention's index has a second predicate"
        );
    }
}

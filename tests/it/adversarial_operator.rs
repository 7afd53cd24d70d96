//! The operator commands attacked as a confused operator and a hostile partner would: rows an
//! older version left with personal values in `last_error`, and customers with a very long
//! history. The built binary runs as a process against real PostgreSQL.

use crate::common;

use common::{TestDb, output_text, run_binary};
use serde_json::Value;

/// The personal values of the seeded row, each echoed in its `last_error`.
const PERSONAL: [&str; 5] = [
    "grace.hopper@example.com",
    "Grace",
    "Hopper",
    "+14155550123",
    "1 Navy Yard",
];

fn cli(db: &TestDb, args: &[&str]) -> (i32, String) {
    let out = run_binary(args, &[("DATABASE_URL", &db.url)]);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

#[tokio::test]
async fn failed_and_replay_dry_run_cut_personal_values_an_older_version_left_in_last_error() {
    let db = TestDb::new().await;
    // Messages as a version before "names the field, never a value" wrote them, or as an API
    // that echoes the refused value (another case, the phone written another way) left them.
    sqlx::raw_sql(
        "INSERT INTO imprint_sync.customer_outbox
             (customer_id, email, phone, first_name, last_name, street_line1, sync_status,
              attempts, last_http_status, last_error_code, last_error)
         VALUES
           ('C-1', 'grace.hopper@example.com', '+14155550123', 'Grace', 'Hopper', '1 Navy Yard',
            'failed', 1, 400, 'INVALID_REQUEST_ERROR',
            'email GRACE.HOPPER@EXAMPLE.COM refused for Grace Hopper at 1 Navy Yard'),
           ('C-2', 'grace.hopper@example.com', '+14155550123', 'Grace', 'Hopper', '1 Navy Yard',
            'failed', 1, 400, 'INVALID_REQUEST_ERROR',
            'phone +1 (415) 555-0123 is not valid; phone: +14155550123');",
    )
    .execute(&db.pool)
    .await
    .expect("seeding");
    for args in [
        &["failed"][..],
        &["failed", "--json"],
        &["run", "--replay-failed", "--dry-run"],
    ] {
        let (code, text) = cli(&db, args);
        assert_eq!(code, 0, "{args:?}:\n{text}");
        for p in PERSONAL {
            assert!(!text.contains(p), "{args:?} printed {p:?}:\n{text}");
        }
        assert!(!text.contains("415"), "{args:?} printed the phone:\n{text}");
        // The message still says what was refused.
        assert!(text.contains("is not valid"), "{args:?}:\n{text}");
    }
    let (_, json) = cli(&db, &["failed", "--json"]);
    let v: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["total"], 2);
}

#[tokio::test]
async fn failed_with_a_window_longer_than_history_lists_everything() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status, last_error_code)
         VALUES ('C-1', 'failed', 'invalid_profile')",
    )
    .execute(&db.pool)
    .await
    .expect("seeding");
    for since in ["3000000d", "18446744073709551615s"] {
        let (code, text) = cli(&db, &["failed", "--json", "--since", since]);
        assert_eq!(code, 0, "--since {since}:\n{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["total"], 1, "--since {since}");
    }
}

#[tokio::test]
async fn status_check_refuses_thresholds_that_can_never_or_always_breach() {
    let db = TestDb::new().await;
    // NaN and infinity never breach (a probe that can never fail); a negative one always does.
    for bad in [
        "--max-oldest-pending=NaN",
        "--max-oldest-pending=inf",
        "--max-oldest-pending=-5",
        "--max-failed=-1",
    ] {
        let (code, text) = cli(&db, &["status", "--check", bad]);
        assert_eq!(code, 64, "{bad}:\n{text}");
        let flag = bad.split('=').next().unwrap_or_default();
        assert!(
            text.contains(flag),
            "{bad}: the error names the flag:\n{text}"
        );
    }
}

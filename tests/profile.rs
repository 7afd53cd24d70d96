//! Outbox row -> request body (DESIGN §2), and every rule that refuses a row (G7), with errors
//! that name the field and never the value (G8).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

use chrono::{TimeZone, Utc};
use imprint_sync::outbox::model::OutboxRow;
use imprint_sync::profile::{ProfileError, map_row};
use serde_json::{Value, json};

const ID: &str = "9B5E1EE0-2E1C-46E7-81B9-3C3917204BE4";

fn body(row: &OutboxRow) -> Value {
    serde_json::to_value(map_row(row).expect("row maps")).unwrap()
}

fn row() -> OutboxRow {
    OutboxRow {
        id: 1,
        customer_id: ID.into(),
        ..OutboxRow::default()
    }
}

/// The row behind the docs page's example request.
fn docs_row() -> OutboxRow {
    let s = |v: &str| Some(v.to_owned());
    OutboxRow {
        email: s("customer@example.com"),
        phone: s("+14155552671"),
        first_name: s("John"),
        last_name: s("Doe"),
        preferred_language: s("en"),
        street_line1: s("123 Main St"),
        street_line2: s("Apt 4B"),
        city: s("San Francisco"),
        state: s("CA"),
        postal_code: s("94105"),
        country: s("USA"),
        account_tenure: Some(13),
        ltv_amount: Some(34000),
        ltv_currency: s("USD"),
        loyalty_tier: s("GOLD"),
        metadata: Some(json!({"preferred_language": "en"})),
        ..row()
    }
}

#[test]
fn the_docs_example_row_maps_to_the_docs_example_body() {
    // The example request of the "Update a customer" page, as published.
    let docs: Value =
        serde_json::from_str(include_str!("fixtures/docs_update_request.json")).unwrap();
    assert_eq!(body(&docs_row()), docs);
}

#[test]
fn the_newer_history_fields_map_too() {
    let created = Utc.with_ymd_and_hms(2021, 3, 4, 5, 6, 7).unwrap();
    let r = OutboxRow {
        account_created_at: Some(created),
        transaction_count: Some(250),
        ..row()
    };
    assert_eq!(
        body(&r),
        json!({"customer_history": {
            "account_created_at": "2021-03-04T05:06:07Z",
            "transaction_count": 250
        }})
    );
}

#[test]
fn an_all_null_row_maps_to_an_empty_body() {
    assert_eq!(body(&row()), json!({}));
}

#[test]
fn null_columns_are_left_out_and_the_rest_is_kept() {
    let r = OutboxRow {
        phone: Some("+14155552671".into()),
        ..row()
    };
    assert_eq!(
        body(&r),
        json!({"phone": "+14155552671", "customer_history": {"phone": "+14155552671"}})
    );
    let r = OutboxRow {
        country: Some("DEU".into()),
        ..row()
    };
    assert_eq!(
        body(&r),
        json!({"customer_history": {"address": {"country": "DEU"}}})
    );
    let r = OutboxRow {
        city: Some("Berlin".into()),
        ltv_amount: Some(0),
        ..row()
    };
    assert_eq!(
        body(&r),
        json!({"city": "Berlin", "customer_history": {"address": {"city": "Berlin"}, "ltv_amount": 0}})
    );
    let r = OutboxRow {
        metadata: Some(json!({})),
        ..row()
    };
    assert_eq!(body(&r), json!({"metadata": {}}));
}

#[test]
fn each_invalid_field_is_named_and_its_value_is_not_echoed() {
    let s = |v: &str| Some(v.to_owned());
    let big = json!({"blob": "y".repeat(16 * 1024)});
    let cases: Vec<(OutboxRow, &str, String)> = vec![
        (
            OutboxRow {
                phone: s("+0123"),
                ..row()
            },
            "phone",
            "+0123".into(),
        ),
        (
            OutboxRow {
                phone: s("415 555 2671"),
                ..row()
            },
            "phone",
            "415 555 2671".into(),
        ),
        (
            OutboxRow {
                email: s("john.doe@@example"),
                ..row()
            },
            "email",
            "john.doe@@example".into(),
        ),
        (
            OutboxRow {
                email: s("john doe@example.com"),
                ..row()
            },
            "email",
            "john doe".into(),
        ),
        (
            OutboxRow {
                country: s("United States"),
                ..row()
            },
            "country",
            "United States".into(),
        ),
        (
            OutboxRow {
                country: s("US"),
                ..row()
            },
            "country",
            "\"US\"".into(),
        ),
        (
            OutboxRow {
                ltv_currency: s("dollars"),
                ..row()
            },
            "ltv_currency",
            "dollars".into(),
        ),
        (
            OutboxRow {
                preferred_language: s("english"),
                ..row()
            },
            "preferred_language",
            "english".into(),
        ),
        (
            OutboxRow {
                account_tenure: Some(-1),
                ..row()
            },
            "account_tenure",
            "-1".into(),
        ),
        (
            OutboxRow {
                ltv_amount: Some(-34000),
                ..row()
            },
            "ltv_amount",
            "-34000".into(),
        ),
        (
            OutboxRow {
                transaction_count: Some(-2),
                ..row()
            },
            "transaction_count",
            "-2".into(),
        ),
        (
            OutboxRow {
                first_name: s(&"x".repeat(256)),
                ..row()
            },
            "first_name",
            "xxxx".into(),
        ),
        (
            OutboxRow {
                last_name: s("Doe\u{7}"),
                ..row()
            },
            "last_name",
            "Doe".into(),
        ),
        (
            OutboxRow {
                city: s("San\nFrancisco"),
                ..row()
            },
            "city",
            "Francisco".into(),
        ),
        (
            OutboxRow {
                metadata: Some(json!("tier=gold")),
                ..row()
            },
            "metadata",
            "tier=gold".into(),
        ),
        (
            OutboxRow {
                metadata: Some(json!(["gold"])),
                ..row()
            },
            "metadata",
            "gold".into(),
        ),
        (
            OutboxRow {
                metadata: Some(big),
                ..row()
            },
            "metadata",
            "yyyy".into(),
        ),
        (
            OutboxRow {
                customer_id: "../x".into(),
                ..row()
            },
            "customer_id",
            "../x".into(),
        ),
        (
            OutboxRow {
                customer_id: "a/b".into(),
                ..row()
            },
            "customer_id",
            "a/b".into(),
        ),
        (
            OutboxRow {
                customer_id: "A".repeat(65),
                ..row()
            },
            "customer_id",
            "AAAA".into(),
        ),
    ];
    for (r, field, value) in cases {
        let e: ProfileError = map_row(&r).expect_err(field);
        assert_eq!(e.field, field);
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("{field}: ")), "{shown}");
        assert!(!shown.contains(&value), "{shown:?} echoes the value");
    }
    let empty = map_row(&OutboxRow {
        customer_id: String::new(),
        ..row()
    });
    assert_eq!(empty.unwrap_err().to_string(), "customer_id: is empty");
}

#[test]
fn the_limits_are_inclusive() {
    let r = OutboxRow {
        first_name: Some("x".repeat(255)),
        customer_id: "A".repeat(64),
        metadata: Some(json!({"b": "y".repeat(16 * 1024 - 10)})),
        ..row()
    };
    assert!(map_row(&r).is_ok());
}

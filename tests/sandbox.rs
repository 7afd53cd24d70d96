//! The sandbox's own contract, over HTTP: what a partner developing against it may rely on.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

use std::collections::HashSet;

use imprint_sync::sandbox::{self, Faults, SandboxHandle, Stats};
use reqwest::StatusCode;
use serde_json::{Value, json};

const KEY: &str = "sandbox-test-key";
const ID: &str = "BBB815E9-F654-438D-9AD3-3F7BB8136FC0";

struct Api {
    sandbox: SandboxHandle,
    http: reqwest::Client,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Api {
    async fn start() -> Self {
        Self {
            sandbox: sandbox::spawn_local(KEY, Faults::default())
                .await
                .expect("sandbox"),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sandbox.addr())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    /// POST with the given key (`None`: no Authorization header) and raw body.
    async fn post_raw(&self, id: &str, key: Option<&str>, body: &str) -> Reply {
        let mut req = self
            .http
            .post(self.url(&format!("/v2/customers/{id}")))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        self.send(req).await
    }

    async fn post(&self, id: &str, body: &Value) -> Reply {
        self.post_raw(id, Some(KEY), &body.to_string()).await
    }

    async fn get(&self, id: &str) -> Reply {
        let url = self.url(&format!("/v2/customers/{id}"));
        self.send(self.http.get(url).bearer_auth(KEY)).await
    }

    async fn put_faults(&self, patch: Value) -> Reply {
        let req = self
            .http
            .put(self.url("/_sandbox/faults"))
            .body(patch.to_string());
        self.send(req).await
    }

    async fn admin(&self, path: &str) -> Value {
        self.send(self.http.get(self.url(path))).await.body
    }

    async fn stats(&self) -> Stats {
        serde_json::from_value(self.admin("/_sandbox/stats").await).expect("stats shape")
    }
}

/// The example request of the "Update a customer" docs page.
fn docs_body() -> Value {
    serde_json::from_str(include_str!("fixtures/docs_update_request.json")).unwrap()
}

fn assert_error(reply: &Reply, status: StatusCode, kind: &str, param: Option<&str>) {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(reply.body["error"]["type"], kind, "body: {}", reply.body);
    assert!(reply.body["error"]["message"].is_string());
    assert_eq!(reply.body["error"]["param"].as_str(), param);
}

#[tokio::test]
async fn a_valid_update_answers_the_whole_customer_object() {
    let api = Api::start().await;
    let r = api.post(ID, &docs_body()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let c = &r.body;
    assert_eq!(c["id"], ID);
    assert_eq!(c["statuses"], json!({"Imprint Card": "OPEN"}));
    assert_eq!(c["ssn4"], "1234");
    assert_eq!(
        c["date_of_birth"],
        json!({"year": 1990, "month": 1, "day": 1})
    );
    assert_eq!(c["email"], "customer@example.com");
    assert_eq!(c["phone"], "+14155552671");
    assert_eq!(c["first_name"], "John");
    assert_eq!(c["preferred_language"], "en");
    assert_eq!(
        c["address"],
        json!({
            "street_line1": "123 Main St", "street_line2": "Apt 4B", "city": "San Francisco",
            "state": "CA", "postal_code": "94105", "country": "USA"
        })
    );
    assert_eq!(c["metadata"], json!({"preferred_language": "en"}));
    for t in ["created_at", "updated_at"] {
        let t = c[t].as_str().expect("timestamp");
        chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339");
    }
    // The client's own type reads it.
    let typed: imprint_sync::imprint::Customer = serde_json::from_value(c.clone()).unwrap();
    assert_eq!(typed.id, ID);

    let g = api.get(ID).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(&g.body, c);
    assert_eq!(api.sandbox.customer(ID).as_ref(), Some(c));
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_changes_nothing() {
    let api = Api::start().await;
    let body = docs_body().to_string();
    for key in [None, Some("wrong-key"), Some("")] {
        let r = api.post_raw(ID, key, &body).await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "AUTHENTICATION_ERROR", None);
    }
    let basic = api
        .send(
            api.http
                .get(api.url(&format!("/v2/customers/{ID}")))
                .basic_auth(KEY, Some("")),
        )
        .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.sandbox.customer(ID), None);
    assert_eq!(api.sandbox.journal(ID), Vec::<Value>::new());
    assert_eq!(api.stats().await.count(401), 4);
}

#[tokio::test]
async fn each_documented_rule_is_a_400_naming_the_field_but_not_the_value() {
    let api = Api::start().await;
    let cases: [(Value, &str, &str); 13] = [
        (json!({"phone": "+0123"}), "phone", "+0123"),
        (json!({"phone": "555-0100"}), "phone", "555-0100"),
        (json!({"email": "not-an-email"}), "email", "not-an-email"),
        (
            json!({"preferred_language": "english"}),
            "preferred_language",
            "english",
        ),
        (
            json!({"customer_history": {"address": {"country": "US"}}}),
            "customer_history.address.country",
            "\"US\"",
        ),
        (
            json!({"customer_history": {"ltv_currency": "ABC"}}),
            "customer_history.ltv_currency",
            "ABC",
        ),
        (
            json!({"customer_history": {"ltv_amount": -1}}),
            "customer_history.ltv_amount",
            "-1",
        ),
        (
            json!({"customer_history": {"transaction_count": 1.5}}),
            "customer_history.transaction_count",
            "1.5",
        ),
        (
            json!({"customer_history": {"phone": "+0999"}}),
            "customer_history.phone",
            "+0999",
        ),
        (
            json!({"customer_history": {"account_created_at": "yesterday"}}),
            "customer_history.account_created_at",
            "yesterday",
        ),
        (json!({"first_name": "a".repeat(256)}), "first_name", "aaaa"),
        (json!({"metadata": "tier=gold"}), "metadata", "tier=gold"),
        (json!({"customer_history": []}), "customer_history", "[]"),
    ];
    for (body, param, value) in cases {
        let r = api.post(ID, &body).await;
        assert_error(
            &r,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST_ERROR",
            Some(param),
        );
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains(value), "{message:?} echoes the value");
    }
    assert_eq!(
        api.sandbox.customer(ID),
        None,
        "a refused body stores nothing"
    );
}

#[tokio::test]
async fn unknown_fields_such_as_a_top_level_country_are_ignored() {
    let api = Api::start().await;
    let r = api
        .post(
            ID,
            &json!({"email": "a@example.com", "country": "US", "nickname": "x"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["email"], "a@example.com");
    assert_eq!(r.body.get("country"), None);
    assert_eq!(r.body["address"].get("country"), None);
}

#[tokio::test]
async fn malformed_json_is_a_400_and_is_journaled_as_text() {
    let api = Api::start().await;
    let r = api.post_raw(ID, Some(KEY), "{\"email\": ").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "INVALID_REQUEST_ERROR", None);
    let r = api.post_raw(ID, Some(KEY), "[1, 2]").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "INVALID_REQUEST_ERROR", None);
    assert_eq!(
        api.admin(&format!("/_sandbox/journal/{ID}")).await,
        json!(["{\"email\": ", [1, 2]])
    );
}

#[tokio::test]
async fn an_unknown_customer_is_404_on_get() {
    let api = Api::start().await;
    let r = api.get(ID).await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "CUSTOMER_NOT_FOUND_ERROR",
        Some("customer_id"),
    );
    // An id that cannot be an Imprint id is not found either, even on POST.
    let r = api.post("a%2Fb", &json!({})).await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "CUSTOMER_NOT_FOUND_ERROR",
        Some("customer_id"),
    );
    assert_eq!(api.stats().await.customers, 0);
}

#[tokio::test]
async fn faults_changed_live_take_effect_on_the_next_request() {
    let api = Api::start().await;
    let ok = json!({"phone": "+14155552671"});

    let r = api.put_faults(json!({"fail_rate": 1.0})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["fail_rate"], 1.0);
    assert_eq!(
        api.post(ID, &ok).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    api.put_faults(json!({"fail_rate": 0.0})).await;
    assert_eq!(api.post(ID, &ok).await.status, StatusCode::OK);

    api.put_faults(json!({"not_found": [ID]})).await;
    let r = api.post(ID, &ok).await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "CUSTOMER_NOT_FOUND_ERROR",
        Some("customer_id"),
    );
    assert_eq!(api.get(ID).await.status, StatusCode::NOT_FOUND);
    api.put_faults(json!({"not_found": []})).await;

    api.put_faults(json!({"rate_limit": 1})).await;
    assert_eq!(api.post(ID, &ok).await.status, StatusCode::OK);
    let r = api.post(ID, &ok).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let r = api.put_faults(json!({"rate_limit": null})).await;
    assert_eq!(r.body["rate_limit"], Value::Null);
    assert_eq!(api.post(ID, &ok).await.status, StatusCode::OK);

    // The other keys were left as they were by each patch.
    assert_eq!(
        api.sandbox.faults(),
        Faults {
            not_found: HashSet::new(),
            ..Faults::default()
        }
    );
    for bad in [
        json!({"fail_rate": 2.0}),
        json!({"rate_limit": 0}),
        json!({"latency": 5}),
    ] {
        assert_eq!(api.put_faults(bad).await.status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let api = Api::start().await;
    api.put_faults(json!({"latency_ms": 300})).await;
    let started = std::time::Instant::now();
    assert_eq!(api.get(ID).await.status, StatusCode::NOT_FOUND);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
}

#[tokio::test]
async fn the_journal_holds_every_authenticated_body_in_arrival_order() {
    let api = Api::start().await;
    let bodies = [
        json!({"phone": "+14155550001"}),
        json!({"phone": "+0"}),
        json!({"phone": "+14155550003", "metadata": {"v": 3}}),
    ];
    for b in &bodies {
        api.post(ID, b).await;
    }
    api.post_raw(ID, Some("wrong"), "{}").await;
    assert_eq!(
        api.admin(&format!("/_sandbox/journal/{ID}")).await,
        json!(bodies)
    );
    assert_eq!(api.sandbox.journal(ID), bodies.to_vec());
    assert_eq!(api.admin("/_sandbox/journal/OTHER").await, json!([]));
}

#[tokio::test]
async fn stats_count_answers_by_status_and_reset_clears_them() {
    let api = Api::start().await;
    api.post(ID, &json!({"email": "a@example.com"})).await;
    api.post(ID, &json!({"email": "b@example.com"})).await;
    api.post(ID, &json!({"email": "b@"})).await;
    api.post_raw(ID, None, "{}").await;
    api.get("OTHER").await;
    let raw = api.admin("/_sandbox/stats").await;
    assert_eq!(raw["by_status"]["200"], 2, "{raw}");
    let stats = api.stats().await;
    assert_eq!(
        stats,
        Stats {
            requests_total: 5,
            by_status: [(200, 2), (400, 1), (401, 1), (404, 1)].into(),
            max_concurrent_per_customer: 1,
            customers: 1,
            reads: 1,
            drift_injected: 0,
        }
    );
    assert_eq!(api.sandbox.stats(), stats);

    let r = api.send(api.http.post(api.url("/_sandbox/reset"))).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let after = api.stats().await;
    assert_eq!(after.requests_total, 0);
    assert_eq!(after.customers, 1, "customers survive a reset");
    assert!(api.sandbox.journal(ID).is_empty());
}

#[tokio::test]
async fn an_update_changes_only_the_fields_it_carries() {
    let api = Api::start().await;
    api.post(ID, &docs_body()).await;
    let r = api
        .post(
            ID,
            &json!({"phone": "+14155550002", "city": "Oakland", "metadata": {"tier": "gold"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["phone"], "+14155550002");
    assert_eq!(r.body["email"], "customer@example.com");
    assert_eq!(r.body["address"]["city"], "Oakland");
    assert_eq!(r.body["address"]["street_line1"], "123 Main St");
    assert_eq!(r.body["address"]["country"], "USA");
    assert_eq!(r.body["metadata"], json!({"tier": "gold"}));
    let first = api.sandbox.customer(ID).unwrap();
    assert_eq!(first["created_at"], r.body["created_at"]);
}

#[tokio::test]
async fn concurrent_requests_for_one_customer_are_seen() {
    let api = Api::start().await;
    api.put_faults(json!({"latency_ms": 200})).await;
    let body = json!({"email": "a@example.com"});
    let (a, b, c) = tokio::join!(api.post(ID, &body), api.post(ID, &body), api.get("OTHER"));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(c.status, StatusCode::NOT_FOUND);
    let stats = api.stats().await;
    assert_eq!(stats.max_concurrent_per_customer, 2);
    assert_eq!(stats.customers, 1);
}

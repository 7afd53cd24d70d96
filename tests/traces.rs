//! Traces: the built binary exports spans over OTLP/HTTP to a receiver in the test, its
//! requests carry the `traceparent` of their span, its JSON log lines carry `trace_id`; and
//! with no endpoint set none of that happens.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap as freely as the tests they serve"
)]

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{Daemon, TestDb, customer_id, env_with, insert, profile};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use url::Url;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// What the receiver got: every POST /v1/traces body, raw.
type Received = Arc<Mutex<Vec<Bytes>>>;

/// An OTLP/HTTP receiver on a free port of 127.0.0.1; answers each export with an empty
/// (protobuf) `ExportTraceServiceResponse`.
async fn receiver() -> (Url, Received) {
    async fn export(State(got): State<Received>, body: Bytes) -> impl axum::response::IntoResponse {
        got.lock().unwrap().push(body);
        ([("content-type", "application/x-protobuf")], Vec::new())
    }
    let got = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}").parse().unwrap(), got)
}

/// Imprint, answering every update with the customer named in the path.
async fn api() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("^/v2/customers/[^/]+$"))
        .respond_with(|req: &Request| {
            let id = req.url.path().rsplit('/').next().unwrap_or_default().to_owned();
            ResponseTemplate::new(200).set_body_json(
                json!({"id": id, "statuses": {"Imprint Card": "OPEN"}, "updated_at": "2026-01-02T03:04:05Z"}),
            )
        })
        .mount(&server)
        .await;
    server
}

/// Three valid rows and one whose e-mail cannot be mapped (it fails alone, with a warning
/// logged inside its row span). Returns (outbox id, customer id) of each, and the invalid
/// e-mail (a personal value that must stay out of the spans too).
async fn seed(db: &TestDb) -> (Vec<(i64, String)>, String) {
    let customers: Vec<String> = (1..=4).map(|n| customer_id(13, n)).collect();
    let bad_email = "ada.lovelace.at.example.com".to_owned();
    let mut rows: Vec<Value> = customers.iter().map(|c| profile(c, 1)).collect();
    rows[3]["email"] = json!(bad_email);
    let ids = insert(&db.pool, &rows).await;
    (ids.into_iter().zip(customers).collect(), bad_email)
}

fn spans(got: &Received) -> Vec<Span> {
    got.lock()
        .unwrap()
        .iter()
        .map(|b| ExportTraceServiceRequest::decode(b.clone()).expect("an OTLP protobuf body"))
        .flat_map(|r| r.resource_spans)
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every attribute of every span and span event, as text.
fn all_attributes(spans: &[Span]) -> Vec<String> {
    let pairs = |kvs: &[KeyValue]| -> Vec<String> {
        kvs.iter()
            .map(|kv| format!("{}={}", kv.key, text(&kv.value)))
            .collect()
    };
    spans
        .iter()
        .flat_map(|s| {
            let mut out = pairs(&s.attributes);
            out.push(s.name.clone());
            for e in &s.events {
                out.push(e.name.clone());
                out.extend(pairs(&e.attributes));
            }
            out
        })
        .collect()
}

#[tokio::test]
async fn run_once_exports_batch_row_and_http_spans_and_links_requests_and_logs() {
    let db = TestDb::new().await;
    let api = api().await;
    let (endpoint, got) = receiver().await;
    let (rows, bad_email) = seed(&db).await;
    let api_url: Url = api.uri().parse().unwrap();
    let mut env = env_with(&db.url, &api_url, &[("LOG__FORMAT", "json")]);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.to_string()));
    // No timed export: whatever arrives was flushed at exit.
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "600000".into()));
    let mut daemon = Daemon::start(&["run", "--once"], &env);
    // One row failed on purpose (invalid_profile): exit 1.
    assert_eq!(
        daemon.exit_code(60).await,
        1,
        "stderr:\n{}",
        daemon.stderr()
    );
    let stderr = daemon.stderr();

    // Timed exports are off: these spans arrived because the process flushed them at exit.
    let spans = spans(&got);
    let named = |n: &str| spans.iter().filter(|s| s.name == n).collect::<Vec<_>>();
    let (batches, row_spans, http) = (named("batch"), named("row"), named("http"));
    assert!(!batches.is_empty(), "no batch span in {spans:#?}");
    assert_eq!(row_spans.len(), 4, "a row span per row: {row_spans:#?}");
    assert_eq!(http.len(), 3, "an http span per request: {http:#?}");
    for (id, customer) in &rows {
        let span = row_spans
            .iter()
            .find(|s| attr(s, "outbox_id").as_deref() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row span for outbox id {id}"));
        assert_eq!(
            attr(span, "customer_id").as_deref(),
            Some(customer.as_str())
        );
        assert!(
            batches.iter().any(|b| b.span_id == span.parent_span_id),
            "the row span's parent is a batch span"
        );
    }
    for h in &http {
        assert_eq!(attr(h, "http.response.status_code").as_deref(), Some("200"));
        assert!(row_spans.iter().any(|r| r.span_id == h.parent_span_id));
    }

    // Each request carried the traceparent of its http span.
    let requests = api.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    for req in &requests {
        let tp = req
            .headers
            .get("traceparent")
            .expect("a traceparent header")
            .to_str()
            .unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "traceparent {tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "traceparent {tp}");
        assert!(
            http.iter()
                .any(|s| hex(&s.trace_id) == parts[1] && hex(&s.span_id) == parts[2]),
            "traceparent {tp} names no exported http span"
        );
    }

    // The failed row's warning, logged inside its row span, carries that span's trace id.
    let (bad_id, _) = &rows[3];
    let warning: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["error_code"] == "invalid_profile" && v["outbox_id"] == json!(bad_id))
        .unwrap_or_else(|| panic!("no invalid_profile line in:\n{stderr}"));
    let trace_id = warning["trace_id"].as_str().expect("trace_id on the line");
    let bad_span = row_spans
        .iter()
        .find(|s| attr(s, "outbox_id") == Some(bad_id.to_string()))
        .unwrap();
    assert_eq!(trace_id, hex(&bad_span.trace_id));

    // No personal value in any span, event or attribute (nor anywhere in the bodies).
    let attributes = all_attributes(&spans).join("\n");
    let personal = [
        bad_email.as_str(),
        "@example.com",
        "+14155550100",
        "Ada",
        "Lovelace",
        "1 Main St",
        "Springfield",
        "62701",
        common::API_KEY,
    ];
    for value in personal {
        assert!(!attributes.contains(value), "{value} in:\n{attributes}");
    }
    let raw = got.lock().unwrap().concat();
    for value in ["@example.com", "+14155550100", "Lovelace", "Springfield"] {
        assert!(
            !raw.windows(value.len()).any(|w| w == value.as_bytes()),
            "{value} in an exported body"
        );
    }
}

#[tokio::test]
async fn sigterm_flushes_the_spans_of_a_running_daemon() {
    let db = TestDb::new().await;
    let api = api().await;
    let (endpoint, got) = receiver().await;
    let customer = customer_id(13, 9);
    insert(&db.pool, &[profile(&customer, 1)]).await;
    let api_url: Url = api.uri().parse().unwrap();
    let mut env = env_with(&db.url, &api_url, &[]);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.to_string()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "600000".into()));
    let mut daemon = Daemon::start(&["run"], &env);
    common::eventually(30, "the row is synced", || async {
        common::counts(&db.pool).await.get("synced") == Some(&1)
    })
    .await;
    assert!(
        spans(&got).is_empty(),
        "nothing is exported before the flush"
    );
    daemon.signal("TERM");
    assert_eq!(
        daemon.exit_code(30).await,
        0,
        "stderr:\n{}",
        daemon.stderr()
    );
    let spans = spans(&got);
    for name in ["batch", "row", "http"] {
        assert!(
            spans.iter().any(|s| s.name == name),
            "no {name} span after SIGTERM: {spans:#?}"
        );
    }
}

#[tokio::test]
async fn without_an_endpoint_requests_carry_no_traceparent_and_logs_no_trace_id() {
    let db = TestDb::new().await;
    let api = api().await;
    let (rows, _) = seed(&db).await;
    let api_url: Url = api.uri().parse().unwrap();
    let env = env_with(&db.url, &api_url, &[("LOG__FORMAT", "json")]);
    let mut daemon = Daemon::start(&["run", "--once"], &env);
    assert_eq!(
        daemon.exit_code(60).await,
        1,
        "stderr:\n{}",
        daemon.stderr()
    );
    let requests = api.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| !r.headers.contains_key("traceparent"))
    );
    let stderr = daemon.stderr();
    let (bad_id, _) = &rows[3];
    assert!(
        stderr.contains(&format!("\"outbox_id\":{bad_id}")),
        "the row's warning is logged:\n{stderr}"
    );
    assert!(!stderr.contains("trace_id"), "{stderr}");
}

#[tokio::test]
async fn an_unusable_endpoint_exits_64_naming_the_variable() {
    let out = common::run_binary(
        &["status"],
        &[
            ("DATABASE_URL", "postgres://127.0.0.1:1/none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[not a host"),
        ],
    );
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{text}");
}

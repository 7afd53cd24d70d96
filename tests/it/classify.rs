//! What each answer of the API means (DESIGN §3), as one table over `classify`, and every
//! error body shape `read_error` must read.

use std::time::{Duration, SystemTime};

use imprint_sync::imprint::error::{
    Answer, ApiError, DEFAULT_RETRY_AFTER, Exchange, TransportError, TransportKind, classify,
    for_customer, parse_retry_after, read_error,
};

const CAP: Duration = Duration::from_secs(60);

/// An answer reduced to what the engine acts on.
#[derive(Debug, PartialEq)]
enum Outcome<'a> {
    Synced(u16, &'a str),
    Retry(Option<u16>, &'a str),
    RateLimited(Duration),
    Failed(u16, &'a str, Option<&'a str>),
    AuthRejected(u16, &'a str),
    Accepted(u16, &'a str),
    Redirected(u16, &'a str),
}

fn outcome(answer: &Answer) -> Outcome<'_> {
    match answer {
        Answer::Synced { status, customer } => Outcome::Synced(*status, &customer.id),
        Answer::Retry { status, error } => Outcome::Retry(*status, &error.code),
        Answer::RateLimited { retry_after } => Outcome::RateLimited(*retry_after),
        Answer::Failed { status, error } => {
            Outcome::Failed(*status, &error.code, error.param.as_deref())
        }
        Answer::AuthRejected { status, error } => Outcome::AuthRejected(*status, &error.code),
        Answer::Accepted { status, error } => Outcome::Accepted(*status, &error.code),
        Answer::Redirected { status, error } => Outcome::Redirected(*status, &error.code),
    }
}

fn response(status: u16, body: &str) -> Exchange {
    Exchange::Response {
        status,
        retry_after: None,
        body: Ok(body.as_bytes().to_vec()),
    }
}

fn limited(retry_after: Option<&str>) -> Exchange {
    Exchange::Response {
        status: 429,
        retry_after: retry_after.map(str::to_owned),
        body: Ok(b"{}".to_vec()),
    }
}

fn transport(kind: TransportKind) -> TransportError {
    TransportError {
        kind,
        message: "operation failed".into(),
    }
}

const WRAPPED_400: &str = r#"{"error":{"type":"INVALID_REQUEST_ERROR","message":"Invalid email format","param":"email"}}"#;
const FLAT_404: &str =
    r#"{"type":"CUSTOMER_NOT_FOUND_ERROR","message":"Customer not found","param":"customer_id"}"#;
const SPRING_422: &str = r#"{"path":"/v2/customers/X","details":["email: must be a well-formed email address"],"error":"Unprocessable Entity","status":422,"timestamp":"2025-02-13T19:08:07Z"}"#;
const WRAPPED_409: &str = r#"{"error":{"type":"BAD_REQUEST_ERROR","message":"conflict"}}"#;

#[test]
fn every_answer_is_classified_as_designed() {
    use Outcome::*;
    let table: Vec<(&str, Exchange, Outcome)> = vec![
        (
            "200 readable",
            response(200, r#"{"id":"C1","email":"a@example.com"}"#),
            Synced(200, "C1"),
        ),
        (
            "201 readable",
            response(201, r#"{"id":"C1"}"#),
            Synced(201, "C1"),
        ),
        // A 2xx that cannot be read was still accepted: synced, unverified, never retried.
        (
            "200 unreadable",
            response(200, "<html>ok</html>"),
            Accepted(200, "unverified_response"),
        ),
        (
            "200 without id",
            response(200, r#"{"email":"a@example.com"}"#),
            Accepted(200, "unverified_response"),
        ),
        (
            "204 empty",
            response(204, ""),
            Accepted(204, "unverified_response"),
        ),
        (
            "200 over 1 MiB",
            Exchange::Response {
                status: 200,
                retry_after: None,
                body: Err(transport(TransportKind::Oversized)),
            },
            Accepted(200, "unverified_response"),
        ),
        (
            "500 over 1 MiB",
            Exchange::Response {
                status: 500,
                retry_after: None,
                body: Err(transport(TransportKind::Oversized)),
            },
            Retry(Some(500), "http_500"),
        ),
        (
            "400 over 1 MiB",
            Exchange::Response {
                status: 400,
                retry_after: None,
                body: Err(transport(TransportKind::Oversized)),
            },
            Failed(400, "http_400", None),
        ),
        // A redirect means a wrong base URL: a pause, like a rejected key.
        ("301", response(301, ""), Redirected(301, "http_301")),
        (
            "302",
            response(302, "<a>moved</a>"),
            Redirected(302, "http_302"),
        ),
        ("308", response(308, ""), Redirected(308, "http_308")),
        (
            "400 wrapped",
            response(400, WRAPPED_400),
            Failed(400, "INVALID_REQUEST_ERROR", Some("email")),
        ),
        (
            "401",
            response(
                401,
                r#"{"error":{"type":"AUTHENTICATION_ERROR","message":"no"}}"#,
            ),
            AuthRejected(401, "AUTHENTICATION_ERROR"),
        ),
        (
            "401 empty",
            response(401, ""),
            AuthRejected(401, "http_401"),
        ),
        (
            "403",
            response(403, WRAPPED_409),
            AuthRejected(403, "BAD_REQUEST_ERROR"),
        ),
        (
            "404 flat",
            response(404, FLAT_404),
            Failed(404, "CUSTOMER_NOT_FOUND_ERROR", Some("customer_id")),
        ),
        (
            "404 empty",
            response(404, ""),
            Failed(404, "CUSTOMER_NOT_FOUND_ERROR", None),
        ),
        (
            "404 html",
            response(404, "<h1>Not Found</h1>"),
            Failed(404, "CUSTOMER_NOT_FOUND_ERROR", None),
        ),
        ("408", response(408, ""), Retry(Some(408), "http_408")),
        (
            "409",
            response(409, WRAPPED_409),
            Retry(Some(409), "BAD_REQUEST_ERROR"),
        ),
        (
            "422 spring",
            response(422, SPRING_422),
            Failed(422, "http_422", Some("email")),
        ),
        (
            "429 seconds",
            limited(Some("7")),
            RateLimited(Duration::from_secs(7)),
        ),
        (
            "429 absent",
            limited(None),
            RateLimited(DEFAULT_RETRY_AFTER),
        ),
        (
            "429 garbage",
            limited(Some("soon")),
            RateLimited(DEFAULT_RETRY_AFTER),
        ),
        ("429 over the cap", limited(Some("3600")), RateLimited(CAP)),
        ("429 absurd", limited(Some("1e300")), RateLimited(CAP)),
        ("500", response(500, ""), Retry(Some(500), "http_500")),
        ("501", response(501, ""), Retry(Some(501), "http_501")),
        (
            "502 html",
            response(502, "<html>Bad Gateway</html>"),
            Retry(Some(502), "http_502"),
        ),
        (
            "503",
            response(503, r#"{"error":{"type":"API_ERROR","message":"down"}}"#),
            Retry(Some(503), "API_ERROR"),
        ),
        (
            "timeout",
            Exchange::Transport(transport(TransportKind::Timeout)),
            Retry(None, "timeout"),
        ),
        (
            "connect refused",
            Exchange::Transport(transport(TransportKind::Connect)),
            Retry(None, "connection_error"),
        ),
        (
            "reset before status",
            Exchange::Transport(transport(TransportKind::Broken)),
            Retry(None, "connection_broken"),
        ),
        (
            "body cut mid-way",
            Exchange::Response {
                status: 200,
                retry_after: None,
                body: Err(transport(TransportKind::Broken)),
            },
            Retry(Some(200), "connection_broken"),
        ),
        (
            "body timed out",
            Exchange::Response {
                status: 400,
                retry_after: None,
                body: Err(transport(TransportKind::Timeout)),
            },
            Retry(Some(400), "timeout"),
        ),
    ];
    for (name, exchange, want) in table {
        assert_eq!(outcome(&classify(exchange, CAP)), want, "case {name}");
    }
}

#[test]
fn a_synced_answer_carries_the_whole_customer() {
    // The example answer of the docs page, plus a field this version does not know.
    let mut body: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/docs_customer_response.json")).unwrap();
    body["future_field"] = 1.into();
    let Answer::Synced { customer, .. } = classify(response(200, &body.to_string()), CAP) else {
        panic!("not synced");
    };
    assert_eq!(customer.id, "9B5E1EE0-2E1C-46E7-81B9-3C3917204BE4");
    assert_eq!(
        customer.statuses.as_ref().unwrap()["Card Program Name"],
        "OPEN"
    );
    assert_eq!(
        customer.address.as_ref().unwrap().country.as_deref(),
        Some("USA")
    );
    assert_eq!(customer.extra["future_field"], 1);
    // Read and written again, nothing is lost.
    assert_eq!(serde_json::to_value(&*customer).unwrap(), body);
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let at = SystemTime::now() + Duration::from_secs(120);
    let Answer::RateLimited { retry_after } = classify(
        limited(Some(&httpdate::fmt_http_date(at))),
        Duration::from_secs(600),
    ) else {
        panic!("not rate limited");
    };
    // The date has whole seconds: between 119 and 120 s from now.
    assert!(retry_after <= Duration::from_secs(120), "{retry_after:?}");
    assert!(retry_after >= Duration::from_secs(118), "{retry_after:?}");
}

#[test]
fn parse_retry_after_reads_both_forms() {
    let now = SystemTime::now();
    let date = |d: SystemTime| httpdate::fmt_http_date(d);
    assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
    assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
    assert_eq!(
        parse_retry_after("1.5", now),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(parse_retry_after("1e300", now), Some(Duration::MAX));
    assert_eq!(parse_retry_after("-1", now), None);
    assert_eq!(parse_retry_after("NaN", now), None);
    assert_eq!(parse_retry_after("soon", now), None);
    let past = now - Duration::from_secs(30);
    assert_eq!(parse_retry_after(&date(past), now), Some(Duration::ZERO));
    let later = parse_retry_after(&date(now + Duration::from_secs(30)), now).unwrap();
    assert!(later > Duration::from_secs(28) && later <= Duration::from_secs(30));
}

fn api_error(code: &str, param: Option<&str>, message: &str) -> ApiError {
    ApiError {
        code: code.into(),
        param: param.map(str::to_owned),
        message: message.into(),
    }
}

/// Only the code and the field name of an error body are kept, never the API's words: they
/// may echo the refused value.
#[test]
fn read_error_reads_every_documented_shape() {
    let cases: [(u16, &str, ApiError); 10] = [
        (
            400,
            WRAPPED_400,
            api_error(
                "INVALID_REQUEST_ERROR",
                Some("email"),
                "HTTP 400 INVALID_REQUEST_ERROR",
            ),
        ),
        (
            409,
            WRAPPED_409,
            api_error("BAD_REQUEST_ERROR", None, "HTTP 409 BAD_REQUEST_ERROR"),
        ),
        (
            404,
            FLAT_404,
            api_error(
                "CUSTOMER_NOT_FOUND_ERROR",
                Some("customer_id"),
                "HTTP 404 CUSTOMER_NOT_FOUND_ERROR",
            ),
        ),
        (
            422,
            SPRING_422,
            api_error("http_422", Some("email"), "HTTP 422"),
        ),
        (
            400,
            r#"{"error":"Bad Request","status":400,"path":"/v2/customers/X"}"#,
            api_error("http_400", None, "HTTP 400"),
        ),
        (
            502,
            "  <html>Bad Gateway</html>\n",
            api_error("http_502", None, "HTTP 502"),
        ),
        (
            503,
            "",
            api_error("http_503", None, "HTTP 503 with an empty body"),
        ),
        (500, r#""oops""#, api_error("http_500", None, "HTTP 500")),
        // A "code" or "field" that is no name is not kept either.
        (
            400,
            r#"{"error":{"type":"bad value ada@example.com","param":"ada@example.com"}}"#,
            api_error("http_400", None, "HTTP 400"),
        ),
        (
            422,
            r#"{"details":["+1 415 555 0100 is not a phone: phone"]}"#,
            api_error("http_422", None, "HTTP 422"),
        ),
    ];
    for (status, body, want) in cases {
        assert_eq!(read_error(status, body.as_bytes()), want, "body {body}");
    }
}

/// A customer object of another customer is not this customer's answer.
#[test]
fn an_answer_about_another_customer_is_retried() {
    let other = classify(response(200, r#"{"id":"c2"}"#), CAP);
    assert_eq!(
        outcome(&for_customer(other, "C1")),
        Outcome::Retry(Some(200), "unreadable_response")
    );
    // Imprint's ids are UUIDs: case does not matter.
    let same = classify(response(200, r#"{"id":"c1"}"#), CAP);
    assert_eq!(
        outcome(&for_customer(same, "C1")),
        Outcome::Synced(200, "c1")
    );
}

/// A hostile or confused API may put the refused value where the code or the field name
/// goes: a name, a phone number without `+`, a metadata key, the API key. Only what is a code
/// (one case throughout) or a path of the request's field names is kept.
#[test]
fn a_value_where_a_name_goes_is_not_kept() {
    let cases: [(&str, ApiError); 7] = [
        (
            r#"{"error":{"type":"INVALID_REQUEST_ERROR","param":"Quuxington"}}"#,
            api_error(
                "INVALID_REQUEST_ERROR",
                None,
                "HTTP 400 INVALID_REQUEST_ERROR",
            ),
        ),
        (
            r#"{"type":"Quuxington","param":"14155550123"}"#,
            api_error("http_400", None, "HTTP 400"),
        ),
        (
            r#"{"error":{"type":"sk_test_Zq8wLEAKCANARY41","param":"sk_test_Zq8wLEAKCANARY41"}}"#,
            api_error("http_400", None, "HTTP 400"),
        ),
        (
            r#"{"details":["Quuxington: is not allowed"]}"#,
            api_error("http_400", None, "HTTP 400"),
        ),
        // The partner's metadata keys are the partner's: the path stops at `metadata`.
        (
            r#"{"error":{"type":"INVALID_REQUEST_ERROR","param":"metadata.ada_lovelace"}}"#,
            api_error(
                "INVALID_REQUEST_ERROR",
                Some("metadata"),
                "HTTP 400 INVALID_REQUEST_ERROR",
            ),
        ),
        // Real names and paths are kept, in either case of code.
        (
            r#"{"error":{"type":"invalid_request_error","param":"customer_history.address.country"}}"#,
            api_error(
                "invalid_request_error",
                Some("customer_history.address.country"),
                "HTTP 400 invalid_request_error",
            ),
        ),
        (
            r#"{"details":["customer_history.phone: must match"]}"#,
            api_error("http_400", Some("customer_history.phone"), "HTTP 400"),
        ),
    ];
    for (body, want) in cases {
        assert_eq!(read_error(400, body.as_bytes()), want, "body {body}");
    }
}

/// A status with no standard meaning (a final 1xx, 600 and up, from a broken proxy) says
/// nothing against the row: retried, never failed for good. A 4xx still fails it.
#[test]
fn a_status_with_no_standard_meaning_is_retried() {
    for status in [101u16, 150, 600, 799, 999] {
        let answer = classify(response(status, ""), CAP);
        let code = format!("http_{status}");
        assert_eq!(
            outcome(&answer),
            Outcome::Retry(Some(status), &code),
            "status {status}"
        );
    }
    let answer = classify(response(499, ""), CAP);
    assert_eq!(outcome(&answer), Outcome::Failed(499, "http_499", None));
}

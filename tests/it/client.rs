//! The real `Client` over TCP: against the in-process sandbox for what each answer becomes, and
//! against wiremock or a raw socket for exact protocol cases.

use std::time::Duration;

use imprint_sync::imprint::error::Answer;
use imprint_sync::imprint::{Client, ClientSettings, UpdateCustomerRequest};
use imprint_sync::sandbox::{self, Faults, SandboxHandle};
use secrecy::SecretString;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "K";
const ID: &str = "BBB815E9-F654-438D-9AD3-3F7BB8136FC0";

fn client_with(base: Url, key: &str, merchant_key: Option<&str>, timeout: Duration) -> Client {
    Client::new(ClientSettings {
        base_url: base,
        key: SecretString::from(key),
        merchant_key: merchant_key.map(SecretString::from),
        timeout,
        connect_timeout: Duration::from_secs(2),
        pool_size: 8,
        max_retry_after: Duration::from_secs(60),
    })
    .expect("client")
}

fn client(base: Url) -> Client {
    client_with(base, KEY, None, Duration::from_secs(5))
}

fn request(phone: &str) -> UpdateCustomerRequest {
    UpdateCustomerRequest {
        email: Some("customer@example.com".into()),
        phone: Some(phone.into()),
        ..UpdateCustomerRequest::default()
    }
}

async fn sandbox_with(faults: Faults) -> SandboxHandle {
    sandbox::spawn_local(KEY, faults).await.expect("sandbox")
}

#[tokio::test]
async fn an_accepted_update_is_synced_with_the_customer() {
    let sb = sandbox_with(Faults::default()).await;
    let answer = client(sb.base_url())
        .update_customer(ID, &request("+14155552671"))
        .await;
    let Answer::Synced { status, customer } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(status, 200);
    assert_eq!(customer.id, ID);
    assert_eq!(customer.phone.as_deref(), Some("+14155552671"));
    assert_eq!(customer.statuses.unwrap()["Imprint Card"], "OPEN");
    assert_eq!(
        sb.journal(ID),
        vec![json!({"email": "customer@example.com", "phone": "+14155552671"})]
    );
    let got = client(sb.base_url()).get_customer(ID).await;
    assert!(matches!(got, Answer::Synced { ref customer, .. } if customer.id == ID));
}

#[tokio::test]
async fn a_rejected_key_pauses() {
    let sb = sandbox_with(Faults::default()).await;
    let c = client_with(sb.base_url(), "wrong", None, Duration::from_secs(5));
    let answer = c.update_customer(ID, &request("+14155552671")).await;
    let Answer::AuthRejected { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (401, "AUTHENTICATION_ERROR"));
}

#[tokio::test]
async fn a_refused_body_fails_naming_the_field() {
    let sb = sandbox_with(Faults::default()).await;
    let answer = client(sb.base_url())
        .update_customer(ID, &request("+0123"))
        .await;
    let Answer::Failed { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(status, 400);
    assert_eq!(error.code, "INVALID_REQUEST_ERROR");
    assert_eq!(error.param.as_deref(), Some("phone"));
}

#[tokio::test]
async fn an_unknown_customer_fails_not_found() {
    let faults = Faults {
        not_found: [ID.to_owned()].into(),
        ..Faults::default()
    };
    let sb = sandbox_with(faults).await;
    let c = client(sb.base_url());
    for answer in [
        c.update_customer(ID, &request("+14155552671")).await,
        c.get_customer("NEVER-SEEN").await,
    ] {
        let Answer::Failed { status, error } = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(
            (status, error.code.as_str()),
            (404, "CUSTOMER_NOT_FOUND_ERROR")
        );
        assert_eq!(error.param.as_deref(), Some("customer_id"));
    }
}

#[tokio::test]
async fn a_rate_limit_answers_with_the_wait() {
    let sb = sandbox_with(Faults {
        rate_limit: Some(1.0),
        ..Faults::default()
    })
    .await;
    let c = client(sb.base_url());
    let first = c.update_customer(ID, &request("+14155552671")).await;
    assert!(matches!(first, Answer::Synced { .. }), "{first:?}");
    let second = c.update_customer(ID, &request("+14155552671")).await;
    assert_eq!(
        second,
        Answer::RateLimited {
            retry_after: Duration::from_secs(1)
        }
    );
    assert_eq!(sb.stats().count(429), 1);
}

#[tokio::test]
async fn a_server_error_is_retried() {
    let sb = sandbox_with(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let answer = client(sb.base_url())
        .update_customer(ID, &request("+14155552671"))
        .await;
    let Answer::Retry { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (Some(500), "API_ERROR"));
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried() {
    let sb = sandbox_with(Faults {
        latency_ms: 3_000,
        ..Faults::default()
    })
    .await;
    let c = client_with(sb.base_url(), KEY, None, Duration::from_millis(300));
    let answer = c.update_customer(ID, &request("+14155552671")).await;
    let Answer::Retry { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (None, "timeout"));
}

fn mock_url(server: &MockServer) -> Url {
    Url::parse(&server.uri()).unwrap()
}

#[tokio::test]
async fn the_request_carries_the_documented_headers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v2/customers/{ID}")))
        .and(header("authorization", "Bearer K"))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": ID})))
        .expect(2)
        .mount(&server)
        .await;

    let plain = client(mock_url(&server));
    let answer = plain.update_customer(ID, &request("+14155552671")).await;
    assert!(matches!(answer, Answer::Synced { .. }), "{answer:?}");
    let with_merchant = client_with(mock_url(&server), KEY, Some("M"), Duration::from_secs(5));
    let answer = with_merchant
        .update_customer(ID, &request("+14155552671"))
        .await;
    assert!(matches!(answer, Answer::Synced { .. }), "{answer:?}");

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    for r in &received {
        let ua = r.headers["user-agent"].to_str().unwrap();
        assert!(ua.starts_with("imprint-sync/"), "{ua}");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"email": "customer@example.com", "phone": "+14155552671"})
        );
    }
    assert!(!received[0].headers.contains_key("x-imprint-merchant-key"));
    assert_eq!(received[1].headers["x-imprint-merchant-key"], "M");
}

#[tokio::test]
async fn a_base_url_with_a_path_keeps_it() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(format!("/imprint/v2/customers/{ID}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": ID})))
        .expect(1)
        .mount(&server)
        .await;
    let base = Url::parse(&format!("{}/imprint", server.uri())).unwrap();
    let answer = client(base).get_customer(ID).await;
    assert!(matches!(answer, Answer::Synced { .. }), "{answer:?}");
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let server = MockServer::start().await;
    Mock::given(path(format!("/v2/customers/{ID}")))
        .respond_with(ResponseTemplate::new(302).insert_header("location", "/elsewhere"))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/elsewhere"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": ID})))
        .expect(0)
        .mount(&server)
        .await;
    let answer = client(mock_url(&server))
        .update_customer(ID, &request("+14155552671"))
        .await;
    // Not a row's failure: a wrong base URL, which pauses sending.
    let Answer::Redirected { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (302, "http_302"));
}

/// A 200 whose chunked body (no length announced) runs past 1 MiB: reading stops there, and
/// the answer counts as accepted but unverified.
#[tokio::test]
async fn a_streamed_answer_past_one_mib_is_not_read_further() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !request_complete(&seen) {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
        // Up to 64 MiB, for as long as the client reads.
        let mut sent = 0usize;
        for _ in 0..1024 {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 0x10000;
        }
        sent
    });
    let base = Url::parse(&format!("http://{addr}/")).unwrap();
    let answer = client(base)
        .update_customer(ID, &request("+14155552671"))
        .await;
    let Answer::Accepted { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (200, "unverified_response"));
    assert!(error.message.contains("1024 KiB"), "{}", error.message);
    let sent = server.await.unwrap();
    assert!(sent < 64 << 20, "the client read all {sent} bytes");
}

/// A server that answers 200 promising 1000 bytes, sends a few, and then closes, or with
/// `stall`, holds the connection open that long.
async fn cut_short_server(stall: Option<Duration>) -> Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the whole request first, so that closing is a clean cut of the answer.
        while !request_complete(&seen) {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(br#"{"id":"BBB8"#).await.unwrap();
        socket.flush().await.unwrap();
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
        }
    });
    Url::parse(&format!("http://{addr}/")).unwrap()
}

fn request_complete(seen: &[u8]) -> bool {
    let text = String::from_utf8_lossy(seen);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

#[tokio::test]
async fn a_body_cut_mid_way_is_retried() {
    let base = cut_short_server(None).await;
    let answer = client(base)
        .update_customer(ID, &request("+14155552671"))
        .await;
    let Answer::Retry { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(
        (status, error.code.as_str()),
        (Some(200), "connection_broken")
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    // Bind, learn the port, close: nothing listens there any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
    let answer = client(base).get_customer(ID).await;
    let Answer::Retry { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (None, "connection_error"));
}

/// An API (or a proxy) that echoes the request's key in its error body: the key is blotted
/// out before the body is read, so it reaches no error code, `last_error` or log line — even
/// a key that looks like a code.
#[tokio::test]
async fn a_key_echoed_by_the_api_is_blotted_out() {
    let key = "sk_test_lowercasecanary";
    let server = MockServer::start().await;
    for (status, at) in [(400u16, "/v2/customers/A1"), (401, "/v2/customers/A2")] {
        let body =
            json!({"error": {"type": key, "param": key, "message": format!("Bearer {key}")}});
        Mock::given(method("POST"))
            .and(path(at))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
    }
    let c = client_with(mock_url(&server), key, None, Duration::from_secs(5));
    for id in ["A1", "A2"] {
        let answer = c.update_customer(id, &request("+14155552671")).await;
        let (Answer::Failed { status, error } | Answer::AuthRejected { status, error }) = &answer
        else {
            panic!("{answer:?}");
        };
        assert!((400..402).contains(status), "{answer:?}");
        assert!(!format!("{answer:?}").contains(key), "{answer:?}");
        assert_eq!(error.code, format!("http_{status}"));
    }
}

/// A body that stalls mid-way, past the timeout, with the connection left open: the request
/// timeout covers the body too, so the answer is a retryable timeout, not a wait for ever.
#[tokio::test]
async fn a_body_stalled_past_the_timeout_is_a_timeout() {
    let base = cut_short_server(Some(Duration::from_secs(60))).await;
    let c = client_with(base, KEY, None, Duration::from_millis(500));
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        c.update_customer(ID, &request("+14155552671")),
    )
    .await
    .expect("the request timeout covers the body");
    let Answer::Retry { status, error } = answer else {
        panic!("{answer:?}");
    };
    assert_eq!((status, error.code.as_str()), (Some(200), "timeout"));
}

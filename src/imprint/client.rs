//! The HTTP client of "Update a customer".

use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tracing::Instrument;
use url::Url;

use super::error::{
    Answer, BODY_MAX, Exchange, TransportError, TransportKind, classify, for_customer,
};
use super::model::UpdateCustomerRequest;

/// A client of Imprint's customer endpoints. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    max_retry_after: Duration,
    /// Kept to blot it out of answers that echo it (see [`without_key`]).
    key: SecretString,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .finish()
    }
}

/// The user agent: name and version.
pub const USER_AGENT: &str = concat!("imprint-sync/", env!("CARGO_PKG_VERSION"));

/// What the client needs: where, with which keys, how long to wait, and how many
/// connections to keep. `Settings::client` builds it from the configuration.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub base_url: Url,
    pub key: SecretString,
    pub merchant_key: Option<SecretString>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Idle connections kept (one per request in flight at once).
    pub pool_size: usize,
    /// The longest `Retry-After` honoured; a longer one is capped.
    pub max_retry_after: Duration,
}

/// A client that cannot be built: the configuration key at fault, and why (never a value).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ClientError {
    pub key: &'static str,
    pub message: String,
}

impl ClientError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

impl Client {
    /// Builds the client: its headers (the keys marked sensitive), timeouts, no redirects.
    pub fn new(settings: ClientSettings) -> Result<Self, ClientError> {
        let ClientSettings {
            base_url: base,
            key,
            merchant_key,
            timeout,
            connect_timeout,
            pool_size,
            max_retry_after,
        } = settings;
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
            .map_err(|_| ClientError::new("api.key", "holds characters not allowed in a header"))?;
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        if let Some(mk) = merchant_key {
            let mut v = HeaderValue::from_str(mk.expose_secret()).map_err(|_| {
                ClientError::new(
                    "api.merchant_key",
                    "holds characters not allowed in a header",
                )
            })?;
            v.set_sensitive(true);
            headers.insert("x-imprint-merchant-key", v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(pool_size.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::new("api", format!("cannot build the HTTP client: {e}")))?;
        let mut base = base;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self {
            http,
            base,
            max_retry_after,
            key,
        })
    }

    fn customer_url(&self, customer_id: &str) -> Url {
        let mut url = self.base.clone();
        // The id was checked to be [A-Za-z0-9_-]; path_segments_mut escapes anything else.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .extend(["v2", "customers", customer_id]);
        }
        url
    }

    /// `POST /v2/customers/{customer_id}`, classified.
    pub async fn update_customer(&self, customer_id: &str, req: &UpdateCustomerRequest) -> Answer {
        let body = match serde_json::to_vec(req) {
            Ok(b) => b,
            Err(e) => {
                return Answer::Failed {
                    status: 0,
                    error: super::error::ApiError::new("unserializable_request", e.to_string()),
                };
            }
        };
        let request = self
            .http
            .post(self.customer_url(customer_id))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        for_customer(self.exchange(request).await, customer_id)
    }

    /// `GET /v2/customers/{customer_id}`, classified.
    pub async fn get_customer(&self, customer_id: &str) -> Answer {
        let answer = self
            .exchange(self.http.get(self.customer_url(customer_id)))
            .await;
        for_customer(answer, customer_id)
    }

    /// One HTTP call, in a span of its own; with traces exported, the request carries that
    /// span's W3C `traceparent` so Imprint's side of the call joins the trace.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Answer {
        let span = tracing::info_span!(
            "http",
            otel.kind = "client",
            http.response.status_code = tracing::field::Empty
        );
        self.send(request).instrument(span).await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> Answer {
        if let Some(traceparent) = crate::telemetry::traceparent() {
            request = request.header("traceparent", traceparent);
        }
        let exchange = match request.send().await {
            Err(e) => Exchange::Transport(transport_error(e)),
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                tracing::Span::current().record("http.response.status_code", status);
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = read_body(&mut resp)
                    .await
                    .map(|b| without_key(b, self.key.expose_secret().as_bytes()));
                Exchange::Response {
                    status,
                    retry_after,
                    body,
                }
            }
        };
        classify(exchange, self.max_retry_after)
    }
}

/// Reads the body as it streams in, up to [`BODY_MAX`]: a longer one is left unread (the
/// connection is dropped with it), so an answer never costs more memory than that.
async fn read_body(resp: &mut reqwest::Response) -> Result<Vec<u8>, TransportError> {
    let oversized = || TransportError {
        kind: TransportKind::Oversized,
        message: format!("a body over {} KiB (not read)", BODY_MAX / 1024),
    };
    if resp.content_length().is_some_and(|n| n > BODY_MAX as u64) {
        return Err(oversized());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > BODY_MAX {
            return Err(oversized());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The body with every copy of the API key blotted out: an API (or a proxy) that echoes the
/// request's `Authorization` in its error could otherwise put the key into an error code,
/// `last_error` or a log line.
fn without_key(body: Vec<u8>, key: &[u8]) -> Vec<u8> {
    if key.is_empty() || !body.windows(key.len()).any(|w| w == key) {
        return body;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body.as_slice();
    while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"[redacted]");
        rest = &rest[at + key.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn transport_error(e: reqwest::Error) -> TransportError {
    let kind = if e.is_timeout() {
        TransportKind::Timeout
    } else if e.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Broken
    };
    // The URL holds only the customer id, but keep messages free of it anyway.
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    TransportError { kind, message }
}

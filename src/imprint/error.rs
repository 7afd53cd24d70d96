//! What an answer of the API means: one function classifies every answer (DESIGN §3).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::model::Customer;

/// Longest error message kept (bytes).
pub const MESSAGE_MAX: usize = 1024;
/// `Retry-After` used for a 429 that carries none.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The classified answer to one request. A value, not an `Err`: the engine applies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx with a readable customer object.
    Synced {
        status: u16,
        customer: Box<Customer>,
    },
    /// Worth trying again later; counts as an attempt.
    Retry {
        status: Option<u16>,
        error: ApiError,
    },
    /// 429: slow the whole sender down; not an attempt.
    RateLimited { retry_after: Duration },
    /// Final for this row (400, 404, 422, other 4xx).
    Failed { status: u16, error: ApiError },
    /// 401/403: the key was rejected. No row changes; sending pauses.
    AuthRejected { status: u16, error: ApiError },
}

/// An error of the API (or of the transport), read from any documented body shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// `type` of the body (`INVALID_REQUEST_ERROR`), or one of ours (`timeout`, `http_500`).
    pub code: String,
    /// The field the API blames, where it says.
    pub param: Option<String>,
    /// Truncated to 1 KiB. Stored in the database, never logged (it may echo a value).
    pub message: String,
}

impl ApiError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            param: None,
            message: truncate(message.into()),
        }
    }
}

/// What happened on the wire, before classification.
#[derive(Debug)]
pub enum Exchange {
    /// A status and the whole body (or the error that cut the body short).
    Response {
        status: u16,
        retry_after: Option<String>,
        body: Result<Vec<u8>, TransportError>,
    },
    /// No status at all.
    Transport(TransportError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Timeout,
    Connect,
    /// The connection broke (reset, closed early, bad framing).
    Broken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub kind: TransportKind,
    pub message: String,
}

impl TransportError {
    fn code(&self) -> &'static str {
        match self.kind {
            TransportKind::Timeout => "timeout",
            TransportKind::Connect => "connection_error",
            TransportKind::Broken => "connection_broken",
        }
    }
}

/// Classifies one exchange (DESIGN §3). `max_retry_after` caps a 429's wait.
pub fn classify(exchange: Exchange, max_retry_after: Duration) -> Answer {
    let (status, retry_after, body) = match exchange {
        Exchange::Transport(e) => {
            return Answer::Retry {
                status: None,
                error: ApiError::new(e.code(), e.message.clone()),
            };
        }
        Exchange::Response {
            status,
            retry_after,
            body,
        } => (status, retry_after, body),
    };
    if status == 429 {
        let wait = retry_after
            .as_deref()
            .and_then(|h| parse_retry_after(h, SystemTime::now()))
            .unwrap_or(DEFAULT_RETRY_AFTER);
        return Answer::RateLimited {
            retry_after: wait.min(max_retry_after),
        };
    }
    let body = match body {
        Ok(b) => b,
        // A body cut short: whatever the status said, the exchange did not complete.
        Err(e) => {
            return Answer::Retry {
                status: Some(status),
                error: ApiError::new(e.code(), e.message),
            };
        }
    };
    match status {
        200..=299 => match serde_json::from_slice::<Customer>(&body) {
            Ok(customer) => Answer::Synced {
                status,
                customer: Box::new(customer),
            },
            Err(e) => Answer::Retry {
                status: Some(status),
                error: ApiError::new(
                    "unreadable_response",
                    format!("{status} with a body that is not a customer object: {e}"),
                ),
            },
        },
        401 | 403 => Answer::AuthRejected {
            status,
            error: read_error(status, &body),
        },
        404 => {
            let mut error = read_error(status, &body);
            if error.code.starts_with("http_") {
                error.code = "CUSTOMER_NOT_FOUND_ERROR".into();
            }
            Answer::Failed { status, error }
        }
        408 | 409 | 425 | 500..=599 => Answer::Retry {
            status: Some(status),
            error: read_error(status, &body),
        },
        _ => Answer::Failed {
            status,
            error: read_error(status, &body),
        },
    }
}

/// Reads an error body in any shape the reference lists: wrapped `{"error":{…}}`, flat
/// `{"type":…}`, Spring-style `{"error":"Bad Request","details":[…]}`, or raw text.
pub fn read_error(status: u16, body: &[u8]) -> ApiError {
    let fallback_code = format!("http_{status}");
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body).trim().to_owned();
        let message = if text.is_empty() {
            format!("HTTP {status} with an empty body")
        } else {
            text
        };
        return ApiError::new(fallback_code, message);
    };
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let shaped = match v.get("error") {
        Some(inner @ Value::Object(_)) => Some(inner),
        _ if v.get("type").is_some() => Some(&v),
        _ => None,
    };
    if let Some(e) = shaped {
        return ApiError {
            code: str_of(e, "type").map_or(fallback_code, truncate),
            param: str_of(e, "param").map(truncate),
            message: truncate(str_of(e, "message").unwrap_or_else(|| e.to_string())),
        };
    }
    // Spring style: `error` is the reason phrase, `details` the field messages.
    let details: Vec<String> = v
        .get("details")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if str_of(&v, "error").is_some() || !details.is_empty() {
        let param = details
            .first()
            .and_then(|d| d.split_once(':'))
            .map(|(field, _)| field.trim().to_owned());
        let message = if details.is_empty() {
            str_of(&v, "message")
                .or_else(|| str_of(&v, "error"))
                .unwrap_or_default()
        } else {
            details.join("; ")
        };
        return ApiError {
            code: fallback_code,
            param,
            message: truncate(message),
        };
    }
    ApiError::new(fallback_code, v.to_string())
}

/// `Retry-After` in either form: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        // `from_secs_f64` would panic on a huge value: treat it as "very long" (capped later).
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Cuts a message to at most [`MESSAGE_MAX`] bytes, the ellipsis included, on a character
/// boundary.
/// NUL bytes are dropped too: PostgreSQL text cannot hold them, and one would stop the
/// write-back of a whole batch.
pub fn truncate(mut s: String) -> String {
    if s.contains('\0') {
        s.retain(|c| c != '\0');
    }
    if s.len() > MESSAGE_MAX {
        let mut end = MESSAGE_MAX - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

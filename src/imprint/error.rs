//! What an answer of the API means: one function classifies every answer (docs/design.md §3).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::model::{Customer, HISTORY_ONLY};

/// Longest error message kept (bytes).
pub const MESSAGE_MAX: usize = 1024;
/// Longest answer body read (bytes). A longer one is not read further: a customer object is a
/// few KiB, and a body held whole could cost the process its memory limit.
pub const BODY_MAX: usize = 1 << 20;
/// Longest error code or field name taken from an answer.
const NAME_MAX: usize = 64;
/// `Retry-After` used for a 429 that carries none.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The classified answer to one request. A value, not an `Err`: the engine applies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx with a readable customer object of the customer asked about.
    Synced {
        status: u16,
        customer: Box<Customer>,
    },
    /// 2xx without a readable customer object (204, a body that is no customer object, one
    /// over [`BODY_MAX`]): Imprint accepted the update, but what it holds is unknown. Final:
    /// sending it again would learn nothing more.
    Accepted { status: u16, error: ApiError },
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
    /// 3xx: `api.base_url` points somewhere else than the API; every row would meet the same
    /// answer. Like a rejected key: no row changes; sending pauses.
    Redirected { status: u16, error: ApiError },
}

impl Answer {
    /// The HTTP status the answer came with (`None`: no answer at all).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Synced { status, .. }
            | Self::Accepted { status, .. }
            | Self::Failed { status, .. }
            | Self::AuthRejected { status, .. }
            | Self::Redirected { status, .. } => Some(*status),
            Self::RateLimited { .. } => Some(429),
            Self::Retry { status, .. } => *status,
        }
    }

    /// The error the answer carries: every answer but a readable 2xx and a 429.
    pub fn error(&self) -> Option<&ApiError> {
        match self {
            Self::Synced { .. } | Self::RateLimited { .. } => None,
            Self::Accepted { error, .. }
            | Self::Retry { error, .. }
            | Self::Failed { error, .. }
            | Self::AuthRejected { error, .. }
            | Self::Redirected { error, .. } => Some(error),
        }
    }
}

/// An error of the API (or of the transport), read from any documented body shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// `type` of the body (`INVALID_REQUEST_ERROR`), or one of ours (`timeout`, `http_500`).
    pub code: String,
    /// The field the API blames, where it says (and it looks like a field name).
    pub param: Option<String>,
    /// Ours, never the API's words (they may echo the refused value); truncated to 1 KiB.
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
    /// The body is longer than [`BODY_MAX`]; it was not read further.
    Oversized,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub kind: TransportKind,
    pub message: String,
}

impl TransportKind {
    /// The error code of a request that ended so.
    pub fn code(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connection_error",
            Self::Broken => "connection_broken",
            Self::Oversized => "oversized_response",
        }
    }
}

impl TransportError {
    fn code(&self) -> &'static str {
        self.kind.code()
    }
}

/// Classifies one exchange (docs/design.md §3). `max_retry_after` caps a 429's wait.
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
        // Too long to read: the status still says what happened; the body is left unread.
        Err(e) if e.kind == TransportKind::Oversized => {
            return classify_unread(status, e);
        }
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
            // serde's message may quote the body: say only where reading stopped.
            Err(_) if body.is_empty() => unverified(status, "an empty body".into()),
            Err(e) => unverified(
                status,
                format!(
                    "a body that is not a customer object (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            ),
        },
        300..=399 => Answer::Redirected {
            status,
            error: read_error(status, &body),
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
        400..=499 if !matches!(status, 408 | 409 | 425) => Answer::Failed {
            status,
            error: read_error(status, &body),
        },
        // 408/409/425, 5xx, and statuses with no standard meaning (a final 1xx, 6xx and up,
        // from a broken proxy): nothing says the row is wrong, so it must not fail for good.
        _ => Answer::Retry {
            status: Some(status),
            error: read_error(status, &body),
        },
    }
}

/// A 2xx that cannot be verified: `synced`, with a code saying so.
fn unverified(status: u16, what: String) -> Answer {
    Answer::Accepted {
        status,
        error: ApiError::new(
            "unverified_response",
            format!(
                "HTTP {status} with {what}: the update was accepted, Imprint's copy is unknown"
            ),
        ),
    }
}

/// An answer whose body was too long to read: classified by its status alone.
fn classify_unread(status: u16, e: TransportError) -> Answer {
    if (200..=299).contains(&status) {
        return unverified(status, e.message);
    }
    let answer = classify(
        Exchange::Response {
            status,
            retry_after: None,
            body: Ok(Vec::new()),
        },
        Duration::ZERO,
    );
    let unread = |mut error: ApiError| {
        error.message = format!("HTTP {status} with {}", e.message);
        error
    };
    match answer {
        Answer::Retry { status, error } => Answer::Retry {
            status,
            error: unread(error),
        },
        Answer::Failed { status, error } => Answer::Failed {
            status,
            error: unread(error),
        },
        other => other,
    }
}

/// Checks that a 2xx is about the customer asked about: another customer's object is not
/// this customer's state (a confused proxy or cache); it is retried, not stored.
pub fn for_customer(answer: Answer, customer_id: &str) -> Answer {
    match answer {
        // Imprint's ids are UUIDs, which compare without regard to case.
        Answer::Synced { status, customer } if !customer.id.eq_ignore_ascii_case(customer_id) => {
            Answer::Retry {
                status: Some(status),
                error: ApiError::new(
                    "unreadable_response",
                    format!("HTTP {status} with the customer object of another customer"),
                ),
            }
        }
        other => other,
    }
}

/// Reads an error body in any shape the reference lists: wrapped `{"error":{…}}`, flat
/// `{"type":…}`, Spring-style `{"error":"Bad Request","details":[…]}`, or raw text.
/// Only the code and the field name are kept, and only when they look like a code and a
/// field name: the API's message may echo the refused value (`bad email: ada@…`), and a log
/// line or `last_error` must not hold it.
pub fn read_error(status: u16, body: &[u8]) -> ApiError {
    let fallback_code = format!("http_{status}");
    let (code, param) = match serde_json::from_slice::<Value>(body) {
        Err(_) if body.iter().all(u8::is_ascii_whitespace) => {
            return ApiError::new(fallback_code, format!("HTTP {status} with an empty body"));
        }
        Err(_) => (None, None),
        Ok(v) => error_names(&v),
    };
    let code = code.unwrap_or(fallback_code);
    let message = if code.starts_with("http_") {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code}")
    };
    ApiError {
        code,
        param,
        message,
    }
}

/// The error code and the blamed field of a JSON error body, where they look like names.
fn error_names(v: &Value) -> (Option<String>, Option<String>) {
    fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
        v.get(k).and_then(Value::as_str)
    }
    let shaped = match v.get("error") {
        Some(inner @ Value::Object(_)) => Some(inner),
        _ if v.get("type").is_some() => Some(v),
        _ => None,
    };
    if let Some(e) = shaped {
        return (
            str_of(e, "type").and_then(code_name),
            str_of(e, "param").and_then(field_name),
        );
    }
    // Spring style: `details` are `field: message` lines; the field is all that is kept.
    let param = v
        .get("details")
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find_map(Value::as_str))
        .and_then(|d| d.split_once(':'))
        .and_then(|(field, _)| field_name(field.trim()));
    (None, param)
}

/// An error code: a letter, then letters, digits and `_`, all of one case
/// (`INVALID_REQUEST_ERROR`, `invalid_request_error`), at most 64 bytes. A hostile or confused
/// API may put a value where the code goes; one case throughout keeps out a name (`Ada`) or a
/// key (`sk_live_Zq8w…`), and digits cannot lead, so a phone number is kept out too.
fn code_name(s: &str) -> Option<String> {
    let upper = s.bytes().all(|b| !b.is_ascii_lowercase());
    let lower = s.bytes().all(|b| !b.is_ascii_uppercase());
    let ok = s.len() <= NAME_MAX
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && (upper || lower);
    ok.then(|| s.to_owned())
}

/// Every name an error may blame: the request's fields (top level, `customer_history`, its
/// `address`; with [`HISTORY_ONLY`]) and the path's `customer_id`.
const FIELDS: [&str; 15] = [
    "customer_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "preferred_language",
    "street_line1",
    "street_line2",
    "city",
    "state",
    "postal_code",
    "country",
    "address",
    "customer_history",
    "metadata",
];

/// A blamed field: a path (`customer_history.address.country`, `phone`) made of
/// the request's field names, cut after `metadata` (whose keys are the partner's). Anything
/// else may be the refused value itself (`Quuxington`, `14155550123`) and is not kept.
fn field_name(s: &str) -> Option<String> {
    let path = match s.find("metadata") {
        Some(at) => &s[..at + "metadata".len()],
        None => s,
    };
    let known = |w: &str| FIELDS.contains(&w) || HISTORY_ONLY.contains(&w);
    let mut words = path.split(['.', '[', ']']).filter(|w| !w.is_empty());
    let ok = path.len() <= NAME_MAX
        && words.next().is_some_and(known)
        && words.all(|w| known(w) || w.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| path.to_owned())
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

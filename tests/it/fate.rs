//! What becomes of a row after each answer (docs/design.md §3), as one table over
//! `engine::fate::decide`: the wire's answer (through `classify`) and the attempt it was
//! for → the row's fate, and how the attempt is logged.

use std::time::Duration;

use imprint_sync::engine::fate::{Fate, Policy, decide, logged_as};
use imprint_sync::imprint::error::{Answer, Exchange, TransportError, TransportKind, classify};
use imprint_sync::outbox::outcome::{AttemptOutcome, ErrorCode};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Backoff ceilings: 300 ms, 600 ms, then the 1 s cap; the fifth attempt is the last.
const POLICY: Policy = Policy {
    max_attempts: 5,
    backoff_base: Duration::from_millis(300),
    backoff_max: Duration::from_secs(1),
    request_timeout: TIMEOUT,
};

fn answer(status: u16, body: &str) -> Answer {
    classify(
        Exchange::Response {
            status,
            retry_after: None,
            body: Ok(body.as_bytes().to_vec()),
        },
        Duration::from_secs(60),
    )
}

fn cut_short(status: u16) -> Answer {
    classify(
        Exchange::Response {
            status,
            retry_after: None,
            body: Err(transport(TransportKind::Broken)),
        },
        Duration::from_secs(60),
    )
}

fn no_answer(kind: TransportKind) -> Answer {
    classify(
        Exchange::Transport(transport(kind)),
        Duration::from_secs(60),
    )
}

fn transport(kind: TransportKind) -> TransportError {
    TransportError {
        kind,
        message: "operation failed".into(),
    }
}

fn retry(ms: u64, hold: Option<Duration>) -> Fate {
    Fate::Retry {
        up_to: Duration::from_millis(ms),
        hold,
    }
}

const REFUSED: Fate = Fate::Failed {
    gave_up: false,
    hold: None,
};

fn gave_up(hold: Option<Duration>) -> Fate {
    Fate::Failed {
        gave_up: true,
        hold,
    }
}

#[test]
fn each_answer_decides_the_row_as_designed() {
    use TransportKind::{Broken, Connect, Timeout};
    const CUSTOMER: &str = r#"{"id":"C1","email":"a@example.com"}"#;
    let held = Some(TIMEOUT);
    let table: Vec<(&str, Answer, u32, Fate)> = vec![
        // Accepted: synced, whatever the attempt, readable or not.
        ("200", answer(200, CUSTOMER), 1, Fate::Synced),
        ("200 last", answer(200, CUSTOMER), 5, Fate::Synced),
        ("204", answer(204, ""), 1, Fate::Synced),
        ("200 unreadable", answer(200, "<html>"), 3, Fate::Synced),
        // A 429 spends no attempt, even the last one: sent again within the lease.
        ("429", answer(429, ""), 1, Fate::SendAgain),
        ("429 last", answer(429, ""), 5, Fate::SendAgain),
        ("429 past", answer(429, ""), 9, Fate::SendAgain),
        // No row gets past a rejected key or a redirect: back untouched, sending pauses.
        ("401", answer(401, ""), 1, Fate::Release),
        ("403 last", answer(403, ""), 5, Fate::Release),
        ("302", answer(302, ""), 1, Fate::Release),
        ("308 last", answer(308, ""), 5, Fate::Release),
        // A refusal is final at once, and never a quiet period (the answer came).
        ("400", answer(400, ""), 1, REFUSED),
        ("404", answer(404, ""), 2, REFUSED),
        ("422 last", answer(422, ""), 5, REFUSED),
        // Retryable: the backoff ceiling doubles up to its cap...
        ("500", answer(500, ""), 1, retry(300, None)),
        ("503", answer(503, ""), 2, retry(600, None)),
        ("409", answer(409, ""), 3, retry(1_000, None)),
        ("408", answer(408, ""), 4, retry(1_000, None)),
        // ... until the attempts run out.
        ("502 last", answer(502, ""), 5, gave_up(None)),
        ("502 past", answer(502, ""), 6, gave_up(None)),
        ("negative count", answer(500, ""), u32::MAX, gave_up(None)),
        // No answer: the request may still be applied, so the customer is held (G2).
        ("timeout", no_answer(Timeout), 1, retry(300, held)),
        ("refused", no_answer(Connect), 2, retry(600, held)),
        ("reset", no_answer(Broken), 4, retry(1_000, held)),
        ("timeout last", no_answer(Timeout), 5, gave_up(held)),
        // A status came, even if the body broke: the request was answered, no hold.
        ("200 cut short", cut_short(200), 1, retry(300, None)),
        ("500 cut short last", cut_short(500), 5, gave_up(None)),
    ];
    let mut wrong = Vec::new();
    for (name, answer, attempt, want) in table {
        let got = decide(&answer, attempt, &POLICY);
        if got != want {
            wrong.push(format!(
                "{name} (attempt {attempt}): got {got:?}, want {want:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// What `sync_attempts.outcome` says of each kind of answer.
#[test]
fn each_attempt_is_logged_as_its_answer() {
    use AttemptOutcome as Log;
    let table = [
        (answer(200, r#"{"id":"C1"}"#), Log::Synced),
        (answer(204, ""), Log::Synced),
        (answer(429, ""), Log::RateLimited),
        (answer(301, ""), Log::Redirected),
        (answer(401, ""), Log::AuthRejected),
        (answer(403, ""), Log::AuthRejected),
        (answer(503, ""), Log::Retry),
        (no_answer(TransportKind::Timeout), Log::Retry),
        (answer(422, ""), Log::Failed),
    ];
    for (answer, want) in table {
        assert_eq!(logged_as(&answer), want, "{answer:?}");
    }
}

/// With a single attempt allowed, the first retryable failure is the last.
#[test]
fn one_attempt_allowed_fails_at_the_first_retryable_answer() {
    let policy = Policy {
        max_attempts: 1,
        ..POLICY
    };
    assert_eq!(
        decide(&answer(503, ""), 1, &policy),
        Fate::Failed {
            gave_up: true,
            hold: None
        }
    );
    assert_eq!(decide(&answer(429, ""), 1, &policy), Fate::SendAgain);
}

/// The stored strings are contracts (docs/design.md §2, docs/operations.md): operators
/// filter on them, so a renamed variant must not rename what is written.
#[test]
fn outcomes_and_codes_are_stored_as_documented() {
    let outcomes: Vec<&str> = AttemptOutcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "synced",
            "rate_limited",
            "redirected",
            "auth_rejected",
            "retry",
            "failed"
        ]
    );
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        codes,
        [
            "invalid_profile",
            "max_attempts_exceeded",
            "poison_row",
            "rate_limited"
        ]
    );
}

//! The built binary as a process: several replicas, kill -9, a database that goes away,
//! signals, the run modes and their exit codes, and what it writes to its logs.

use crate::common;

use std::collections::BTreeSet;
use std::io::Read;
use std::time::Duration;

use common::{
    API_KEY, Daemon, TestDb, counts, customer_id, env_with, eventually, insert, profile, row, rows,
    sandbox, version_of,
};
use imprint_sync::sandbox::{Faults, SandboxHandle};
use rustix::fs::inotify;
use rustix::process::{Pid, Signal, kill_process};
use serde_json::json;

fn latency(ms: u64) -> Faults {
    Faults {
        latency_ms: ms,
        ..Faults::default()
    }
}

fn env(db: &TestDb, sandbox: &SandboxHandle, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    env_with(&db.url, &sandbox.base_url(), overrides)
}

async fn count_of(db: &TestDb, status: &str) -> i64 {
    counts(&db.pool).await.get(status).copied().unwrap_or(0)
}

/// G1 + G3 across replicas: two processes drain one outbox at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_send_only_the_newest_one_at_a_time() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults {
        latency_ms: 20,
        fail_rate: 0.1,
        ..Faults::default()
    })
    .await;
    let newest = common::seed_versions(&db.pool, 21, 300).await;
    let env = env(
        &db,
        &sandbox,
        &[("SYNC__BATCH_SIZE", "25"), ("SYNC__CONCURRENCY", "16")],
    );

    let mut a = Daemon::start(&["run", "--once"], &env);
    let mut b = Daemon::start(&["run", "--once"], &env);
    assert_eq!(a.exit_code(90).await, 0, "{}", a.stderr());
    assert_eq!(b.exit_code(90).await, 0, "{}", b.stderr());

    common::assert_newest_only(&db.pool, &sandbox, &newest).await;
    let workers: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT worker_id) FROM imprint_sync.sync_attempts")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(workers, 2, "both processes sent requests");
}

/// G4/G5: kill -9 with requests in flight, then a restart: every row ends synced, newest
/// version only, never two requests at once for a customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_loses_nothing_after_a_restart() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(300)).await;
    let newest = common::seed_versions(&db.pool, 22, 60).await;
    let env = env(
        &db,
        &sandbox,
        &[
            ("SYNC__CONCURRENCY", "8"),
            ("API__TIMEOUT_MS", "1000"),
            ("SYNC__LEASE_MS", "6500"),
        ],
    );

    let mut first = Daemon::start(&["run"], &env);
    eventually(30, "some rows are synced", || async {
        count_of(&db, "synced").await >= 8
    })
    .await;
    first.kill9().await;
    let in_flight = count_of(&db, "in_flight").await;
    assert!(
        in_flight > 0,
        "the kill left no row in flight: nothing was proved"
    );

    let mut second = Daemon::start(&["run", "--once"], &env);
    assert_eq!(second.exit_code(90).await, 0, "{}", second.stderr());

    common::assert_newest_only(&db.pool, &sandbox, &newest).await;
}

/// G5: the database goes away for a few seconds mid-run (as in a restart); the daemon waits,
/// says so, and finishes with every row synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_outlives_a_database_outage() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(250)).await;
    common::seed_customers(&db.pool, 23, 60).await;
    let env = env(
        &db,
        &sandbox,
        &[("SYNC__CONCURRENCY", "4"), ("SYNC__BATCH_SIZE", "4")],
    );

    let mut daemon = Daemon::start(&["run", "--once"], &env);
    eventually(30, "some rows are synced", || async {
        count_of(&db, "synced").await >= 4
    })
    .await;
    db.set_available(false).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.set_available(true).await;

    let code = daemon.exit_code(90).await;
    let stderr = daemon.stderr();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("database unavailable"), "{stderr}");
    assert_eq!(
        count_of(&db, "synced").await,
        60,
        "{:?}",
        counts(&db.pool).await
    );
}

/// 404 fails the row (exit 1); once the customer exists, `run --replay-failed --once` puts
/// both failed rows back, and the claim sends the newest, merged per column, superseding the
/// older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_row_syncs_once_the_customer_exists() {
    let db = TestDb::new().await;
    let c = customer_id(24, 1);
    let sandbox = sandbox(Faults {
        not_found: [c.clone()].into(),
        ..Faults::default()
    })
    .await;
    let env = env(&db, &sandbox, &[]);
    let mut ids = Vec::new();
    for version in 1..=2 {
        ids.extend(insert(&db.pool, &[profile(&c, version)]).await);
        let mut run = Daemon::start(&["run", "--once"], &env);
        assert_eq!(run.exit_code(60).await, 1, "a failed row exits 1");
        let r = row(&db.pool, ids[version as usize - 1]).await;
        assert_eq!(r.sync_status, "failed");
        assert_eq!(
            r.last_error_code.as_deref(),
            Some("CUSTOMER_NOT_FOUND_ERROR")
        );
    }

    sandbox.set_faults(Faults::default()).unwrap();
    let mut replay = Daemon::start(&["run", "--replay-failed", "--once"], &env);
    assert_eq!(replay.exit_code(60).await, 0, "{}", replay.stderr());

    let out = replay.stdout();
    assert!(out.contains("2 failed rows back to pending"), "{out}");
    let (old, new) = (row(&db.pool, ids[0]).await, row(&db.pool, ids[1]).await);
    assert_eq!((new.sync_status.as_str(), new.attempts), ("synced", 1));
    assert_eq!(
        (old.sync_status.as_str(), old.superseded_by),
        ("superseded", Some(ids[1]))
    );
    let journal = sandbox.journal(&c);
    assert_eq!(journal.last().and_then(version_of), Some(2));
    assert!(sandbox.customer(&c).is_some());
}

/// `run --once` exits 1 when a row failed in the run, a row that could not be mapped too.
#[tokio::test]
async fn once_exits_1_when_a_row_cannot_be_mapped() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let mut bad = profile(&customer_id(25, 1), 1);
    bad["phone"] = json!("+0123");
    let ids = insert(&db.pool, &[profile(&customer_id(25, 2), 1), bad]).await;

    let mut run = Daemon::start(&["run", "--once"], &env(&db, &sandbox, &[]));

    assert_eq!(run.exit_code(60).await, 1, "{}", run.stderr());
    assert_eq!(row(&db.pool, ids[0]).await.sync_status, "synced");
    let bad = row(&db.pool, ids[1]).await;
    assert_eq!(bad.sync_status, "failed");
    assert_eq!(bad.last_error_code.as_deref(), Some("invalid_profile"));
}

/// `run --dry-run` shows what would be sent, personal values redacted; it sends nothing
/// and changes nothing.
#[tokio::test]
async fn a_dry_run_shows_redacted_requests_and_touches_nothing() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let (a, b) = (customer_id(26, 1), customer_id(26, 2));
    let mut bad = profile(&customer_id(26, 3), 1);
    bad["country"] = json!("ZZZ");
    insert(
        &db.pool,
        &[profile(&a, 1), profile(&a, 2), profile(&b, 1), bad],
    )
    .await;
    let before = rows(&db.pool).await;

    let mut run = Daemon::start(&["run", "--dry-run"], &env(&db, &sandbox, &[]));

    assert_eq!(run.exit_code(60).await, 0, "{}", run.stderr());
    let out = run.stdout();
    assert!(out.contains(&a) && out.contains(&b), "{out}");
    assert!(out.contains("[redacted]"), "{out}");
    assert!(
        out.contains("country"),
        "the invalid row names its field: {out}"
    );
    for personal in ["@example.com", "+14155550100", "Lovelace", "Main St"] {
        assert!(!out.contains(personal), "{personal} in {out}");
    }
    assert_eq!(sandbox.stats().requests_total, 0);
    let after = rows(&db.pool).await;
    let state = |rs: &[common::RowState]| -> Vec<(i64, String, i32)> {
        rs.iter()
            .map(|r| (r.id, r.sync_status.clone(), r.attempts))
            .collect()
    };
    assert_eq!(state(&after), state(&before));
    assert!(after.iter().all(|r| r.sync_status == "pending"));
}

/// A second signal while the first one's stop waits for requests in flight exits at once
/// with 130. Both signals are logged, under the target they have always had (log filters and
/// queries name it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_while_stopping_exits_130() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(20_000)).await;
    common::seed_customers(&db.pool, 29, 4).await;
    let overrides = [("API__TIMEOUT_MS", "20000"), ("SYNC__LEASE_MS", "30000")];
    let mut daemon = Daemon::start(&["run"], &env(&db, &sandbox, &overrides));
    eventually(30, "rows are claimed", || async {
        count_of(&db, "in_flight").await > 0
    })
    .await;
    daemon.signal("TERM");
    eventually(10, "the first signal is logged", || {
        std::future::ready(daemon.stderr().contains("no new rows are claimed"))
    })
    .await;
    daemon.signal("INT");

    assert_eq!(daemon.exit_code(10).await, 130, "{}", daemon.stderr());
    let lines: Vec<serde_json::Value> = daemon
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for (message, signal) in [
        ("stopping: no new rows are claimed", "SIGTERM"),
        ("second signal: exiting at once", "SIGINT"),
    ] {
        let line = lines
            .iter()
            .find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no line {message:?}: {}", daemon.stderr()));
        assert_eq!(line["signal"], signal, "{line}");
        assert_eq!(line["target"], "imprint_sync::engine::shutdown", "{line}");
    }
}

/// `imprint-sync sandbox` stops on SIGTERM and on SIGINT alike: it says so and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_command_stops_on_sigterm_or_sigint() {
    for signal in ["TERM", "INT"] {
        let args = ["sandbox", "--listen", "127.0.0.1:0", "--api-key", "K"];
        let mut sandbox = Daemon::start(&args, &[]);
        eventually(30, "the sandbox listens", || {
            std::future::ready(sandbox.stderr().contains("sandbox listening"))
        })
        .await;
        sandbox.signal(signal);
        assert_eq!(sandbox.exit_code(10).await, 0, "{}", sandbox.stderr());
        assert!(
            sandbox.stderr().contains("sandbox stopping"),
            "{signal}: {}",
            sandbox.stderr()
        );
    }
}

/// SIGTERM while requests are in flight: they finish, nothing is left `in_flight`, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_finish_and_leaves_nothing_in_flight() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(1000)).await;
    common::seed_customers(&db.pool, 27, 20).await;
    let mut daemon = Daemon::start(&["run"], &env(&db, &sandbox, &[("SYNC__CONCURRENCY", "4")]));
    eventually(30, "rows are claimed", || async {
        count_of(&db, "in_flight").await > 0
    })
    .await;
    // Let the first requests reach the sandbox, then stop while they wait for answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal("TERM");

    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
    assert_eq!(count_of(&db, "in_flight").await, 0);
    let synced: BTreeSet<String> = rows(&db.pool)
        .await
        .into_iter()
        .filter(|r| r.sync_status == "synced")
        .map(|r| r.customer_id)
        .collect();
    assert!(!synced.is_empty(), "no request in flight finished");
    let sent: BTreeSet<String> = (0..20)
        .map(|n| customer_id(27, n))
        .filter(|c| !sandbox.journal(c).is_empty())
        .collect();
    assert_eq!(sent, synced, "every request sent finished and was recorded");
    assert!(synced.len() < 20, "the stop came after the work was done");
    // Rows claimed but never sent went back untouched.
    assert_eq!(count_of(&db, "pending").await, 20 - synced.len() as i64);
}

/// G8: at info and at debug, the logs hold neither the API key nor a personal value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_key_and_no_personal_value() {
    let db = TestDb::new().await;
    let missing = customer_id(28, 9);
    let sandbox = sandbox(Faults {
        fail_rate: 0.3,
        not_found: [missing.clone()].into(),
        ..Faults::default()
    })
    .await;
    let personal = [
        "zelda.canary@example.org",
        "+14155550199",
        "Zelda",
        "Quuxington",
        "742 Evergreen Terrace",
        "Shelbyville",
        "+0999888777",
        "bad@@canary",
    ];
    let seed = |n: u32| {
        let mut p = profile(&customer_id(28, n), 1);
        p["email"] = json!(personal[0]);
        p["phone"] = json!(personal[1]);
        p["first_name"] = json!(personal[2]);
        p["last_name"] = json!(personal[3]);
        p["street_line1"] = json!(personal[4]);
        p["city"] = json!(personal[5]);
        p
    };
    for level in ["info", "debug"] {
        let mut bad_phone = seed(7);
        bad_phone["phone"] = json!(personal[6]);
        let mut bad_email = seed(8);
        bad_email["email"] = json!(personal[7]);
        let mut not_found = seed(9);
        not_found["customer_id"] = json!(missing);
        insert(
            &db.pool,
            &[seed(1), seed(2), bad_phone, bad_email, not_found],
        )
        .await;
        let env = env(&db, &sandbox, &[("LOG__LEVEL", level)]);

        let mut run = Daemon::start(&["run", "--once"], &env);

        assert_eq!(run.exit_code(60).await, 1);
        let logs = run.stderr();
        assert!(logs.contains("imprint-sync running"), "{logs}");
        assert!(logs.contains("outbox_id"), "rows are named by id: {logs}");
        assert!(!logs.contains(API_KEY), "the API key at {level}");
        for value in personal {
            assert!(
                !logs.contains(value),
                "{value:?} in the {level} log:\n{logs}"
            );
        }
    }
}

/// `run --once` stopped by SIGTERM before it drained says so: exit 75 (EX_TEMPFAIL), so a
/// Kubernetes Job is retried instead of looking complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_stopped_before_draining_exits_75() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(1000)).await;
    common::seed_customers(&db.pool, 31, 20).await;
    let env = env(&db, &sandbox, &[("SYNC__CONCURRENCY", "2")]);
    let mut daemon = Daemon::start(&["run", "--once"], &env);
    eventually(30, "rows are claimed", || async {
        count_of(&db, "in_flight").await > 0
    })
    .await;
    daemon.signal("TERM");

    assert_eq!(daemon.exit_code(30).await, 75, "{}", daemon.stderr());
    assert!(
        count_of(&db, "pending").await > 0,
        "the stop came before the drain"
    );
    assert_eq!(count_of(&db, "in_flight").await, 0);
}

/// A SIGTERM at the very start of `run --once` (while it opens its configuration file, before
/// tracing or the database) stops it like one at any later moment: 75 (or 0 if drained),
/// never death by the signal (143). inotify tells the test the moment the file is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_exits_75() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    common::seed_customers(&db.pool, 32, 5).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("imprint-sync.toml");
    std::fs::write(&config, "[sync]\nbatch_size = 100\n").expect("writing the config");
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC).expect("inotify_init1");
    inotify::add_watch(&watch, config.as_path(), inotify::WatchFlags::OPEN)
        .expect("inotify_add_watch");
    let mut daemon = Daemon::start(
        &["--config", config.to_str().unwrap(), "run", "--once"],
        &env(&db, &sandbox, &[]),
    );
    let pid = i32::try_from(daemon.pid())
        .ok()
        .and_then(Pid::from_raw)
        .expect("a pid");
    // Blocks until the daemon opens its configuration; then the signal goes at once.
    let mut event = [0u8; 4096];
    let n = std::fs::File::from(watch)
        .read(&mut event)
        .expect("reading the inotify event");
    assert!(n > 0, "reading the inotify event");
    kill_process(pid, Signal::TERM).expect("kill -TERM");

    let code = daemon.exit_code(30).await;
    assert!(code == 75 || code == 0, "exit {code}: {}", daemon.stderr());
    assert_eq!(count_of(&db, "in_flight").await, 0);
}

/// A customer id is the partner's text until validated: a 100,000-character id, an e-mail
/// used as an id, or a newline that would forge a line never reach the logs as they are; the
/// outbox id names the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_customer_id_never_reaches_the_logs() {
    let db = TestDb::new().await;
    let sandbox = sandbox(Faults::default()).await;
    let long = "A".repeat(100_000);
    let email = "ada.idcanary@example.com";
    let forged = "C1\n2026-11-27T00:00:00.000000Z ERROR imprint_sync: FORGED-LINE";
    for format in ["pretty", "json"] {
        let ids = insert(
            &db.pool,
            &[
                json!({"customer_id": long, "first_name": "Ada"}),
                json!({"customer_id": email, "first_name": "Ada"}),
                json!({"customer_id": forged, "first_name": "Ada"}),
            ],
        )
        .await;
        let env = env(
            &db,
            &sandbox,
            &[("LOG__FORMAT", format), ("LOG__LEVEL", "debug")],
        );
        let mut run = Daemon::start(&["run", "--once"], &env);

        assert_eq!(run.exit_code(60).await, 1, "{format}");
        let logs = run.stderr();
        for id in ids {
            let r = row(&db.pool, id).await;
            assert_eq!(
                r.last_error_code.as_deref(),
                Some("invalid_profile"),
                "{r:?}"
            );
            assert!(
                logs.contains(&id.to_string()),
                "row {id} is named in the {format} log"
            );
        }
        let longest = logs.lines().map(str::len).max().unwrap_or(0);
        assert!(
            longest <= 2_000,
            "a {longest}-byte line in the {format} log"
        );
        assert!(
            !logs.contains(email),
            "the e-mail in the {format} log:\n{logs}"
        );
        assert!(
            !logs.contains("FORGED-LINE"),
            "the forged line in the {format} log:\n{logs}"
        );
    }
}

/// A 2xx whose body is 64 MB: read up to 1 MiB, never held whole. The row is synced (the
/// update was accepted) but marked unverified, and the process's peak memory stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mb_answer_is_never_held_in_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = url::Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    let customer = customer_id(32, 1);
    let server = {
        let customer = customer.clone();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return 0,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            // A valid customer object, padded to 64 MB: only its size makes it unreadable.
            let head = format!(r#"{{"id":"{customer}","padding":""#);
            let tail = r#""}"#;
            let len = 64 << 20;
            let pad = len - head.len() - tail.len();
            let status = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{head}"
            );
            let mut sent = 0usize;
            if socket.write_all(status.as_bytes()).await.is_err() {
                return sent;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = pad;
            while left > 0 {
                let n = left.min(chunk.len());
                if socket.write_all(&chunk[..n]).await.is_err() {
                    return sent;
                }
                sent += n;
                left -= n;
            }
            let _ = socket.write_all(tail.as_bytes()).await;
            sent + tail.len()
        })
    };
    let ids = insert(&db.pool, &[profile(&customer, 1)]).await;
    let env = env_with(&db.url, &api, &[("SYNC__MAX_ATTEMPTS", "1")]);

    let mut daemon = Daemon::start(&["run"], &env);
    eventually(60, "the row is synced", || async {
        row(&db.pool, ids[0]).await.sync_status == "synced"
    })
    .await;
    // The peak so far, the answer's reading included (the row is synced once it is read),
    // read while the process lives: a reaped one has no /proc entry.
    let peak_kib = peak_rss_kib(daemon.pid());
    daemon.signal("TERM");
    let code = daemon.exit_code(30).await;
    let _ = server.await;

    eprintln!("a 64 MB answer: exit {code}, peak RSS {peak_kib} KiB");
    assert_eq!(code, 0);
    let r = row(&db.pool, ids[0]).await;
    assert_eq!(r.sync_status, "synced", "{r:?}");
    assert_eq!(
        r.last_error_code.as_deref(),
        Some("unverified_response"),
        "{r:?}"
    );
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
}

/// The peak resident set of a live process so far (`VmHWM`, KiB).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// The pretty log writes each code field as it always has: the API's code (`%`, bare) where
/// the worker named the API's answer, and its own codes as quoted text (`"invalid_profile"`,
/// `"max_attempts_exceeded"`). Operators grep these lines; issue 14 changed no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pretty_log_writes_error_codes_as_before() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let (refused, failing, unread, invalid) = (
        customer_id(37, 1),
        customer_id(37, 2),
        customer_id(37, 3),
        customer_id(37, 4),
    );
    let answers = [
        (
            &refused,
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "INVALID_REQUEST_ERROR", "param": "email", "message": "bad"}})),
        ),
        (&failing, ResponseTemplate::new(500)),
        (&unread, ResponseTemplate::new(204)),
    ];
    for (customer, answer) in answers {
        Mock::given(method("POST"))
            .and(path(format!("/v2/customers/{customer}")))
            .respond_with(answer)
            .mount(&server)
            .await;
    }
    let mut bad = profile(&invalid, 1);
    bad["phone"] = json!("0123");
    insert(
        &db.pool,
        &[
            profile(&refused, 1),
            profile(&failing, 1),
            profile(&unread, 1),
            bad,
        ],
    )
    .await;
    let api = url::Url::parse(&server.uri()).unwrap();
    let env = env_with(
        &db.url,
        &api,
        &[
            ("LOG__FORMAT", "pretty"),
            ("LOG__LEVEL", "debug"),
            ("SYNC__MAX_ATTEMPTS", "2"),
        ],
    );

    let mut run = Daemon::start(&["run", "--once"], &env);

    assert_eq!(run.exit_code(60).await, 1, "{}", run.stderr());
    let logs = run.stderr();
    for (message, fields) in [
        (
            "row cannot be mapped; marked failed",
            &[r#"error_code="invalid_profile""#][..],
        ),
        (
            "the API refused the row; marked failed",
            &["error_code=INVALID_REQUEST_ERROR"],
        ),
        ("retrying later", &["error_code=http_500"]),
        (
            "giving up on row",
            &[
                r#"error_code="max_attempts_exceeded""#,
                "last_error_code=http_500",
            ],
        ),
        (
            "synced, but the answer could not be read",
            &["error_code=unverified_response"],
        ),
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no line {message:?}:\n{logs}"));
        for field in fields {
            assert!(
                line.split_whitespace().any(|w| w == *field),
                "{field} in {line:?}"
            );
        }
    }
}

/// G8 against a hostile API: an error body that echoes the API key (read from a key file
/// that ends in a newline) where the code and the field name go, and a personal value as the
/// field, reach neither the logs (at trace, so every crate's lines count; json and pretty)
/// nor the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_echoing_the_key_or_a_value_leaks_neither() {
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let db = TestDb::new().await;
    let server = MockServer::start().await;
    let surname = "Quuxington";
    let body = json!({"error": {"type": API_KEY, "param": surname,
        "message": format!("Authorization: Bearer {API_KEY}")}});
    Mock::given(method("POST"))
        .and(path_regex("^/v2/customers/"))
        .respond_with(ResponseTemplate::new(400).set_body_json(body))
        .mount(&server)
        .await;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{API_KEY}\n")).unwrap();
    let key_path = key_file.path().to_str().unwrap();
    let api = url::Url::parse(&server.uri()).unwrap();
    for (n, format) in (0..).zip(["json", "pretty"]) {
        let mut p = profile(&customer_id(33, n), 1);
        p["last_name"] = json!(surname);
        let ids = insert(&db.pool, &[p]).await;
        let mut env = env_with(
            &db.url,
            &api,
            &[
                ("LOG__FORMAT", format),
                ("LOG__LEVEL", "trace"),
                ("API__KEY_FILE", key_path),
            ],
        );
        env.retain(|(k, _)| k != "IMPRINT_SYNC__API__KEY");

        let mut run = Daemon::start(&["run", "--once"], &env);

        assert_eq!(run.exit_code(60).await, 1, "{}", run.stderr());
        let logs = format!("{}{}", run.stdout(), run.stderr());
        assert!(logs.contains(&ids[0].to_string()), "{logs}");
        let r = row(&db.pool, ids[0]).await;
        assert_eq!(r.sync_status, "failed", "{r:?}");
        let logged: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT error_code, error_message FROM imprint_sync.sync_attempts
             WHERE outbox_id = $1",
        )
        .bind(ids[0])
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let stored = format!("{r:?} {logged:?}");
        for canary in [API_KEY, surname] {
            assert!(
                !logs.contains(canary),
                "{canary} in the {format} log:\n{logs}"
            );
            assert!(!stored.contains(canary), "{canary} stored: {stored}");
        }
    }
}

/// A TCP proxy to PostgreSQL that can black-hole: on `cut`, every open connection stops
/// forwarding (stays open, nothing passes either way) and connections made meanwhile hang;
/// on `heal`, new connections pass again (the cut ones stay silent for ever).
struct Proxy {
    port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, c) = (generation.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (g, c) = (g.clone(), c.clone());
                tokio::spawn(async move {
                    if c.load(SeqCst) {
                        // Accepted, never answered: hold the socket open.
                        let _held = &client;
                        std::future::pending::<()>().await;
                    }
                    let born = g.load(SeqCst);
                    let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, g.clone(), born));
                    pump(sr, cw, g, born).await;
                });
            }
        });
        Self {
            port,
            generation,
            cut,
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies until the proxy is cut after this connection was made; then holds both ends open
/// and forwards nothing more.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(std::sync::atomic::Ordering::SeqCst) != born {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A connection black-holed in the middle of the claim or the write-back (no RST, no FIN:
/// a silent network) is given up after `statement_timeout_ms` + a margin, logged as the
/// database being unavailable, and the daemon recovers on a new connection once one can be
/// made: the outbox ends drained with no request sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_database_connection_is_given_up_and_recovered() {
    let db = TestDb::new().await;
    let sandbox = sandbox(latency(20)).await;
    common::seed_customers(&db.pool, 33, 400).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(upstream).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    let env = env_with(
        url.as_str(),
        &sandbox.base_url(),
        &[
            ("DATABASE__STATEMENT_TIMEOUT_MS", "1000"),
            ("DATABASE__MAX_CONNECTIONS", "4"),
            // Longer than the outage: no row is rescued and sent again meanwhile.
            ("SYNC__LEASE_MS", "120000"),
            ("SYNC__CONCURRENCY", "4"),
            ("SYNC__BATCH_SIZE", "20"),
        ],
    );
    let mut daemon = Daemon::start(&["run"], &env);
    eventually(60, "some rows are synced", || async {
        count_of(&db, "synced").await >= 20
    })
    .await;

    // Hold the daemon's claim and write-back mid-statement (waiting for a lock), then cut:
    // their answers are lost in the black hole.
    let mut locker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE imprint_sync.customer_outbox IN SHARE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    eventually(
        30,
        "a statement of the daemon waits for the lock",
        || async {
            // This database's waits only: another test's lock wait is not the daemon's.
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks
                 WHERE NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
                > 0
        },
    )
    .await;
    proxy.cut();
    locker.commit().await.unwrap();
    // The deadline is 3 s; without it the daemon waits for the OS (minutes).
    eventually(30, "the daemon logs the database as unavailable", || {
        std::future::ready(daemon.stderr().contains("database unavailable"))
    })
    .await;
    assert!(count_of(&db, "synced").await < 400, "the cut came too late");
    proxy.heal();

    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while count_of(&db, "synced").await < 400 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let logs = daemon.stderr();
    let tail: Vec<&str> = logs.lines().rev().take(40).collect();
    assert!(
        drained.is_ok(),
        "not drained after the heal; {:?}; log tail:\n{}",
        counts(&db.pool).await,
        tail.join("\n")
    );
    for n in 0..400 {
        let c = customer_id(33, n);
        assert_eq!(sandbox.journal(&c).len(), 1, "{c} was sent more than once");
    }
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(30).await, 0, "{}", daemon.stderr());
}

//! The configuration: layering, the key file, the shipped defaults, and every validation
//! error as an operator meets it (the binary's exit code and message).

use crate::common;

use std::io::Write;
use std::process::Output;

use common::{TestDb, output_text, run_binary};
use imprint_sync::config::{ConfigError, DEFAULT_TOML, LEASE_MARGIN_MS, Settings};
use imprint_sync::telemetry::LogFormat;
use secrecy::ExposeSecret;
use tempfile::NamedTempFile;

const KEY: &str = "sk_live_9f8e7d6c5b4a-never-print-me";
const DB_PASSWORD: &str = "hunter2-db-pass";

fn toml_file(text: &str) -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("writing temp file");
    file
}

fn load(file: Option<&NamedTempFile>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Settings::load_from(file.map(NamedTempFile::path), env)
}

fn check_config(env: &[(&str, &str)]) -> Output {
    run_binary(&["check-config"], env)
}

fn assert_config_error(out: &Output, key: &str, case: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{case}: exit code; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!("`{key}`")),
        "{case}: stderr should name `{key}`: {stderr}"
    );
}

fn assert_ok(out: &Output, case: &str) {
    assert_eq!(out.status.code(), Some(0), "{case}: {}", output_text(out));
}

#[test]
fn defaults_are_the_documented_values() {
    let s = load(None, &[]).expect("defaults load");
    assert_eq!(
        s.database.url,
        "postgres://postgres@localhost:5432/postgres"
    );
    assert_eq!(s.database.max_connections, 8);
    assert_eq!(
        (s.database.statement_timeout_ms, s.database.lock_timeout_ms),
        (30_000, 5_000)
    );
    assert_eq!(s.api.base_url, "https://dev.sbx.imprint.co");
    assert!(s.api.key.is_none() && s.api.key_file.is_none() && s.api.merchant_key.is_none());
    assert_eq!(
        (s.api.timeout_ms, s.api.connect_timeout_ms),
        (10_000, 3_000)
    );
    assert!(!s.api.allow_insecure_http);
    assert_eq!(s.sync.batch_size, 500);
    assert_eq!(s.sync.concurrency, 64);
    assert_eq!(s.sync.poll_interval_ms, 1_000);
    assert_eq!(s.sync.lease_ms, 60_000);
    assert_eq!(s.sync.max_attempts, 10);
    assert_eq!(
        (s.sync.backoff_base_ms, s.sync.backoff_max_ms),
        (1_000, 300_000)
    );
    assert_eq!(s.sync.shutdown_grace_ms, 10_000);
    assert_eq!(s.rate_limit.requests_per_second, 50.0);
    assert_eq!(
        (s.rate_limit.burst, s.rate_limit.max_retry_after_ms),
        (10, 60_000)
    );
    assert_eq!(
        (s.retention.synced_days, s.retention.attempts_days),
        (30, 14)
    );
    assert_eq!(s.admin.listen, "127.0.0.1:9187");
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.log.level, "info");
    assert!(!s.privacy.store_sensitive_response_fields);
}

#[test]
fn built_in_defaults_are_the_shipped_file() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("reading config/default.toml");
    assert_eq!(DEFAULT_TOML, shipped);
}

/// A line that sets a key, or shows one commented out (`# key = ""`).
fn key_of(line: &str) -> Option<&str> {
    let line = line.trim_start_matches('#').trim();
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

#[test]
fn every_key_in_default_toml_has_a_comment_with_its_default() {
    let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
    let mut keys = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(key) = key_of(line) else { continue };
        keys += 1;
        let comment: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#') && key_of(l).is_none())
            .copied()
            .collect();
        assert!(!comment.is_empty(), "`{key}` has no comment line above it");
        assert!(
            comment.iter().any(|l| l.to_lowercase().contains("default")),
            "the comment above `{key}` does not state its default: {comment:?}"
        );
    }
    assert!(keys >= 25, "only {keys} keys found in config/default.toml");
}

#[test]
fn every_setting_appears_in_default_toml() {
    let settings = serde_json::to_value(load(None, &[]).expect("defaults load")).unwrap();
    let mut section = String::new();
    let mut documented = Vec::new();
    for line in DEFAULT_TOML.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some(key) = key_of(line) {
            documented.push(format!("{section}.{key}"));
        }
    }
    for (section, keys) in settings.as_object().unwrap() {
        for key in keys.as_object().unwrap().keys() {
            let name = format!("{section}.{key}");
            assert!(
                documented.contains(&name),
                "{name} is missing from default.toml"
            );
        }
    }
}

#[test]
fn layers_default_then_file_then_environment() {
    let file = toml_file("[sync]\nbatch_size = 100\nconcurrency = 7\n");
    let s = load(Some(&file), &[("IMPRINT_SYNC__SYNC__CONCURRENCY", "9")]).unwrap();
    assert_eq!(s.sync.poll_interval_ms, 1_000, "default kept");
    assert_eq!(s.sync.batch_size, 100, "file beats default");
    assert_eq!(s.sync.concurrency, 9, "environment beats file");
}

#[test]
fn database_url_is_honoured_below_the_prefixed_variable() {
    let file = toml_file("[database]\nurl = \"postgres://file@localhost/file\"\n");
    let from_env = "postgres://env@localhost/env";
    let s = load(Some(&file), &[("DATABASE_URL", from_env)]).unwrap();
    assert_eq!(s.database.url, from_env, "DATABASE_URL beats the file");

    let prefixed = "postgres://prefixed@localhost/prefixed";
    let s = load(
        Some(&file),
        &[
            ("DATABASE_URL", from_env),
            ("IMPRINT_SYNC__DATABASE__URL", prefixed),
        ],
    )
    .unwrap();
    assert_eq!(
        s.database.url, prefixed,
        "IMPRINT_SYNC__DATABASE__URL beats DATABASE_URL"
    );
}

#[test]
fn key_file_is_read_with_the_trailing_newline_trimmed() {
    let key_file = toml_file(&format!("{KEY}\n"));
    let path = key_file.path().to_str().unwrap();
    let s = load(None, &[("IMPRINT_SYNC__API__KEY_FILE", path)]).unwrap();
    assert_eq!(s.api.key.as_ref().map(|k| k.expose_secret()), Some(KEY));
}

#[test]
fn key_and_key_file_together_are_refused() {
    let key_file = toml_file(KEY);
    let path = key_file.path().to_str().unwrap();
    let err = load(
        None,
        &[
            ("IMPRINT_SYNC__API__KEY_FILE", path),
            ("IMPRINT_SYNC__API__KEY", KEY),
        ],
    )
    .unwrap_err();
    assert_eq!(err.key, "api.key_file", "{err}");
}

#[test]
fn a_missing_key_file_is_named() {
    let path = "/nonexistent/imprint-api-key";
    let err = load(None, &[("IMPRINT_SYNC__API__KEY_FILE", path)]).unwrap_err();
    assert_eq!(err.key, "api.key_file", "{err}");
    assert!(err.message.contains(path), "{err}");
}

#[test]
fn debug_output_never_shows_secrets() {
    let db_url = format!("postgres://app:{DB_PASSWORD}@localhost:5432/app");
    let s = load(
        None,
        &[
            ("IMPRINT_SYNC__API__KEY", KEY),
            ("IMPRINT_SYNC__API__MERCHANT_KEY", "merchant-secret-42"),
            ("DATABASE_URL", &db_url),
        ],
    )
    .unwrap();
    assert!(s.api.key.is_some() && s.api.merchant_key.is_some());
    for text in [format!("{s:?}"), format!("{s:#?}"), s.redacted_toml()] {
        assert!(!text.contains(KEY), "API key printed: {text}");
        assert!(
            !text.contains("merchant-secret-42"),
            "merchant key printed: {text}"
        );
        assert!(
            !text.contains(DB_PASSWORD),
            "database password printed: {text}"
        );
    }
}

#[test]
fn check_config_redacts_the_key_and_the_database_password() {
    let key_file = toml_file(&format!("{KEY}\n"));
    let db_url = format!("postgres://app:{DB_PASSWORD}@db.internal:5432/app");
    for key_var in [
        ("IMPRINT_SYNC__API__KEY", KEY),
        (
            "IMPRINT_SYNC__API__KEY_FILE",
            key_file.path().to_str().unwrap(),
        ),
    ] {
        let out = check_config(&[key_var, ("DATABASE_URL", &db_url)]);
        assert_ok(&out, key_var.0);
        let text = output_text(&out);
        assert!(!text.contains(KEY), "{}: key printed: {text}", key_var.0);
        assert!(!text.contains(DB_PASSWORD), "password printed: {text}");
        assert!(text.contains(r#"key = "[redacted]""#), "{text}");
        assert!(text.contains("db.internal:5432/app"), "{text}");
    }
}

#[test]
fn check_config_layers_the_config_file_under_the_environment() {
    let file = toml_file("[sync]\nbatch_size = 100\nconcurrency = 7\n");
    let path = file.path().to_str().unwrap();
    let out = run_binary(
        &["check-config", "--config", path],
        &[("IMPRINT_SYNC__SYNC__CONCURRENCY", "9")],
    );
    assert_ok(&out, "--config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("batch_size = 100\n"), "{stdout}");
    assert!(stdout.contains("concurrency = 9\n"), "{stdout}");
}

#[test]
fn each_invalid_value_exits_64_naming_the_key() {
    let timeout = 10_000;
    let short_lease = (timeout + LEASE_MARGIN_MS - 1).to_string();
    let cases: &[(&str, &str, &str)] = &[
        ("IMPRINT_SYNC__API__BASE_URL", "not a url", "api.base_url"),
        (
            "IMPRINT_SYNC__API__BASE_URL",
            "http://example.com",
            "api.base_url",
        ),
        (
            "IMPRINT_SYNC__API__BASE_URL",
            "ftp://example.com",
            "api.base_url",
        ),
        ("IMPRINT_SYNC__SYNC__LEASE_MS", "10000", "sync.lease_ms"),
        (
            "IMPRINT_SYNC__SYNC__LEASE_MS",
            &short_lease,
            "sync.lease_ms",
        ),
        ("IMPRINT_SYNC__SYNC__BATCH_SIZE", "0", "sync.batch_size"),
        ("IMPRINT_SYNC__SYNC__CONCURRENCY", "0", "sync.concurrency"),
        (
            "IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND",
            "0",
            "rate_limit.requests_per_second",
        ),
        ("IMPRINT_SYNC__SYNC__BATCH_SIZE", "abc", "sync.batch_size"),
        ("IMPRINT_SYNC__SYNC__BATCH_SIZEE", "5", "sync.batch_sizee"),
        ("IMPRINT_SYNC__ADMIN__LISTEN", "nowhere", "admin.listen"),
        ("DATABASE_URL", "not a url", "database.url"),
    ];
    for (var, value, key) in cases {
        let out = check_config(&[(var, value)]);
        assert_config_error(&out, key, &format!("{var}={value}"));
    }
}

#[test]
fn plain_http_is_allowed_for_loopback_or_when_asked() {
    let lease_at_margin = (10_000 + LEASE_MARGIN_MS).to_string();
    let cases: &[&[(&str, &str)]] = &[
        &[("IMPRINT_SYNC__API__BASE_URL", "http://127.0.0.1:8089")],
        &[("IMPRINT_SYNC__API__BASE_URL", "http://localhost:8089")],
        &[
            ("IMPRINT_SYNC__API__BASE_URL", "http://example.com"),
            ("IMPRINT_SYNC__API__ALLOW_INSECURE_HTTP", "true"),
        ],
        &[("IMPRINT_SYNC__SYNC__LEASE_MS", &lease_at_margin)],
    ];
    for env in cases {
        assert_ok(&check_config(env), &format!("{env:?}"));
    }
}

#[test]
fn an_unknown_key_in_the_file_is_named() {
    let file = toml_file("[sync]\nbatch_sise = 100\n");
    let out = run_binary(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[],
    );
    assert_config_error(&out, "sync.batch_sise", "unknown key in --config file");
}

#[test]
fn a_missing_config_file_exits_64() {
    let out = run_binary(
        &["check-config", "--config", "/nonexistent/imprint.toml"],
        &[],
    );
    assert_config_error(&out, "--config", "missing --config file");
}

#[tokio::test]
async fn run_needs_a_key() {
    // An empty, migrated outbox and a loopback API: once `run --once` exists it finds
    // nothing due and exits 0; today it exits 2 (not implemented). Never 64 with a key.
    let db = TestDb::new().await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("IMPRINT_SYNC__API__BASE_URL", "http://127.0.0.1:9"),
    ];
    let out = run_binary(&["run", "--once"], &env);
    assert_config_error(&out, "api.key", "run without a key");

    let with_key = [env[0], env[1], ("IMPRINT_SYNC__API__KEY", KEY)];
    let out = run_binary(&["run", "--once"], &with_key);
    assert_ne!(out.status.code(), Some(64), "{}", output_text(&out));
    assert!(!output_text(&out).contains(KEY));
}

/// Values past any sane bound, and values that cannot travel where they go: each exits 64
/// naming its key, before anything connects or sends (issue 10, section 6).
#[test]
fn out_of_range_and_unusable_values_exit_64_naming_the_key() {
    let newline_key = format!("{KEY}\nX-Forged: 1");
    let cases: &[(&str, &str, &str)] = &[
        // 1e16 ms passed, then every claim failed: the lease overflows an interval.
        (
            "IMPRINT_SYNC__SYNC__LEASE_MS",
            "10000000000000000",
            "sync.lease_ms",
        ),
        // Overflowed `concurrency + batch_size` and panicked at `run`.
        (
            "IMPRINT_SYNC__SYNC__CONCURRENCY",
            "4294966796",
            "sync.concurrency",
        ),
        // Wrapped `timeout + margin` in the lease check (a panic in a debug build).
        (
            "IMPRINT_SYNC__API__TIMEOUT_MS",
            "18446744073709551000",
            "api.timeout_ms",
        ),
        (
            "IMPRINT_SYNC__SYNC__BATCH_SIZE",
            "1000000",
            "sync.batch_size",
        ),
        (
            "IMPRINT_SYNC__SYNC__MAX_ATTEMPTS",
            "4294967295",
            "sync.max_attempts",
        ),
        (
            "IMPRINT_SYNC__RETENTION__SYNCED_DAYS",
            "4294967295",
            "retention.synced_days",
        ),
        (
            "IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND",
            "1e300",
            "rate_limit.requests_per_second",
        ),
        (
            "IMPRINT_SYNC__DATABASE__STATEMENT_TIMEOUT_MS",
            "0",
            "database.statement_timeout_ms",
        ),
        (
            "IMPRINT_SYNC__DATABASE__LOCK_TIMEOUT_MS",
            "100000000000",
            "database.lock_timeout_ms",
        ),
        // A key with a line break passed check-config and failed every request at `run`.
        ("IMPRINT_SYNC__API__KEY", &newline_key, "api.key"),
        (
            "IMPRINT_SYNC__API__MERCHANT_KEY",
            "merchant\r\nkey",
            "api.merchant_key",
        ),
        // sqlx refused it only at connect: exit 70.
        (
            "DATABASE_URL",
            "postgres://app@db.internal:5432/app?sslmode=bogus",
            "database.url",
        ),
        // A misspelt parameter is ignored by sqlx: plaintext where TLS was meant.
        (
            "DATABASE_URL",
            "postgres://app@db.internal:5432/app?ssl_mode=verify-full",
            "database.url",
        ),
        (
            "DATABASE_URL",
            "mysql://app@db.internal/app",
            "database.url",
        ),
    ];
    for (var, value, key) in cases {
        let out = check_config(&[(var, value)]);
        assert_config_error(&out, key, &format!("{var}={value:?}"));
        assert!(
            !output_text(&out).contains(KEY),
            "{var}: the key was printed"
        );
    }
}

/// A key file whose key holds a line break is named as the file (the header would fail).
#[test]
fn a_key_file_with_a_line_break_inside_is_refused() {
    let key_file = toml_file(&format!("{KEY}\n{KEY}\n"));
    let path = key_file.path().to_str().unwrap();
    let err = load(None, &[("IMPRINT_SYNC__API__KEY_FILE", path)]).unwrap_err();
    assert_eq!(err.key, "api.key_file", "{err}");
    assert!(!err.to_string().contains(KEY), "{err}");
}

/// `run` with a key that cannot be a header exits 64 at start, not 70 (or a retry loop).
#[test]
fn run_with_a_key_holding_a_line_break_exits_64() {
    let key = format!("{KEY}\n");
    let out = run_binary(
        &["run", "--once"],
        &[
            ("IMPRINT_SYNC__API__KEY", key.as_str()),
            ("IMPRINT_SYNC__API__BASE_URL", "http://127.0.0.1:9"),
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none"),
        ],
    );
    assert_config_error(&out, "api.key", "run with a newline in the key");
    assert!(!output_text(&out).contains(KEY));
}

/// Credentials in the API's base URL would be printed by check-config and logged: refused,
/// and the refusal does not echo them.
#[test]
fn credentials_in_the_api_base_url_are_refused_without_echoing_them() {
    for url in [
        "https://partner:s3cr3t-pw@api.example.com",
        "https://api.example.com/?token=s3cr3t-pw",
        "https://api.example.com/#s3cr3t-pw",
    ] {
        let out = check_config(&[("IMPRINT_SYNC__API__BASE_URL", url)]);
        assert_config_error(&out, "api.base_url", url);
        assert!(
            !output_text(&out).contains("s3cr3t-pw"),
            "{url}: {}",
            output_text(&out)
        );
    }
}

/// A password given as a query parameter of database.url is redacted like one in the user
/// info, in check-config's output and in Debug.
#[test]
fn check_config_redacts_a_password_in_the_database_url_query() {
    for url in [
        format!("postgres://app@db.internal:5432/app?password={DB_PASSWORD}&application_name=x"),
        format!("postgres://app@db.internal:5432/app?pass%77ord={DB_PASSWORD}"),
        format!("postgres://app:{DB_PASSWORD}@db.internal:5432/app?password={DB_PASSWORD}"),
    ] {
        let out = check_config(&[("DATABASE_URL", &url)]);
        assert_ok(&out, &url);
        let text = output_text(&out);
        assert!(!text.contains(DB_PASSWORD), "password printed: {text}");
        assert!(text.contains("db.internal:5432/app"), "{text}");
        let s = load(None, &[("DATABASE_URL", &url)]).unwrap();
        assert!(!format!("{s:?}").contains(DB_PASSWORD), "Debug: {s:?}");
    }
}

/// Runs the binary with its address space capped (2 GiB), so a configuration that makes it
/// read without end fails the test instead of taking the machine's memory.
fn run_binary_capped(args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary = env!("CARGO_BIN_EXE_imprint-sync");
    let mut all = vec!["-c", "ulimit -v 2097152; exec \"$0\" \"$@\"", binary];
    all.extend_from_slice(args);
    let mut cmd = std::process::Command::new("sh");
    cmd.args(&all).env_clear().envs(env.iter().copied());
    cmd.output().expect("running the imprint-sync binary")
}

/// `api.key_file` must be a small regular file: /dev/zero was read until out of memory, and
/// a 2 MiB file was taken as a key to send in every request's header (adversarial review).
#[test]
fn a_key_file_that_is_a_device_or_huge_exits_64() {
    let huge = toml_file(&"k".repeat(2 * 1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    for path in [
        "/dev/zero",
        huge.path().to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ] {
        let out = run_binary_capped(&["check-config"], &[("IMPRINT_SYNC__API__KEY_FILE", path)]);
        assert_config_error(&out, "api.key_file", path);
        assert!(
            output_text(&out).contains("regular file") || output_text(&out).contains("larger"),
            "{path}: {}",
            output_text(&out)
        );
    }
}

/// A certificate path of `database.url` that is a directory failed every connection as an
/// I/O error: `run` retried it for ever, `status` and `migrate` exited 70; /dev/zero was read
/// until out of memory. Both are configuration errors naming database.url.
#[tokio::test]
async fn a_database_certificate_path_that_is_not_a_small_file_exits_64() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    for (param, path) in [
        ("sslrootcert", dir.path().to_str().unwrap()),
        ("sslrootcert", "/dev/zero"),
    ] {
        url.query_pairs_mut()
            .clear()
            .append_pair("sslmode", "verify-full")
            .append_pair(param, path);
        for args in [&["status"][..], &["migrate"][..]] {
            let out = run_binary_capped(args, &[("DATABASE_URL", url.as_str())]);
            assert_config_error(&out, "database.url", &format!("{args:?} {param}={path}"));
            assert!(output_text(&out).contains(param), "{}", output_text(&out));
        }
    }
}

/// An unknown parameter is named in the error, but a name that decodes to `password=…`
/// (`password%3D…`), or a bare value with no `=`, is a pasted secret: never echoed.
#[test]
fn an_unknown_database_url_parameter_never_echoes_a_secret() {
    for url in [
        format!("postgres://app@db.internal:5432/app?password%3D{DB_PASSWORD}"),
        format!("postgres://app@db.internal:5432/app?sslmode=require&{DB_PASSWORD}"),
        format!("postgres://app@db.internal:5432/app?%3D{DB_PASSWORD}"),
    ] {
        let out = check_config(&[("DATABASE_URL", &url)]);
        assert_config_error(&out, "database.url", &url);
        let text = output_text(&out);
        assert!(
            !text.contains(DB_PASSWORD),
            "{url}: password printed: {text}"
        );
        assert!(text.contains("unknown parameter"), "{text}");
    }
    // A plain misspelt name is still named, so the operator can fix it.
    let out = check_config(&[(
        "DATABASE_URL",
        "postgres://app@db.internal:5432/app?sslmod=verify-full",
    )]);
    assert_config_error(&out, "database.url", "sslmod");
    assert!(
        output_text(&out).contains("`sslmod`"),
        "{}",
        output_text(&out)
    );
}

/// `options=-c statement_timeout=0` (or `options[lock_timeout]=0`) in `database.url` must
/// not switch off the daemon's own timeouts: they are what keep a black-holed or blocked
/// statement from stalling the claimer.
#[tokio::test]
async fn database_url_options_cannot_override_the_daemons_timeouts() {
    let db = TestDb::new().await;
    for options in [
        "options=-c%20statement_timeout%3D0%20-c%20lock_timeout%3D0",
        "options[statement_timeout]=0&options[lock_timeout]=0",
    ] {
        let url = format!("{}?{options}", db.url);
        let settings = load(None, &[("DATABASE_URL", &url)]).expect(options);
        let pool = imprint_sync::db::pool(&settings.database).unwrap();
        let (statement, lock): (String, String) = sqlx::query_as(
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')",
        )
        .fetch_one(&pool)
        .await
        .expect(options);
        assert_eq!(
            (statement.as_str(), lock.as_str()),
            ("30s", "5s"),
            "{options}"
        );
        pool.close().await;
    }
}

/// A misspelt `log.level` (`inof`) is a valid tracing directive meaning "everything of the
/// target `inof`": the daemon ran logging nothing at all. And a rate below the limiter's
/// floor (0.001/s) was silently raised to it. Both exit 64 naming the key (adversarial review).
#[test]
fn a_misspelt_log_level_or_a_rate_below_the_floor_exits_64() {
    for (var, value, key) in [
        ("IMPRINT_SYNC__LOG__LEVEL", "inof", "log.level"),
        (
            "IMPRINT_SYNC__LOG__LEVEL",
            "info,imprint_sync=verbose",
            "log.level",
        ),
        (
            "IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND",
            "1e-300",
            "rate_limit.requests_per_second",
        ),
    ] {
        let out = check_config(&[(var, value)]);
        assert_config_error(&out, key, value);
    }
    for level in [
        "warn",
        "INFO",
        "info,imprint_sync=debug",
        "imprint_sync::engine=trace",
    ] {
        assert_ok(&check_config(&[("IMPRINT_SYNC__LOG__LEVEL", level)]), level);
    }
}

/// A libpq host list (`h1,h2`) passed check-config, then every connection failed as a DNS
/// lookup of the whole list: `status` exited 70 and `run` retried for ever.
#[test]
fn a_database_url_with_several_hosts_exits_64() {
    for url in [
        "postgres://app@db1.internal,db2.internal:5432/app",
        "postgres://app@db1.internal:5432/app?host=db1.internal,db2.internal",
    ] {
        assert_config_error(&check_config(&[("DATABASE_URL", url)]), "database.url", url);
    }
}

/// Environment names are matched without regard to case: two spellings of one key made the
/// value depend on a hash map's order, different from run to run. Refused, naming the key
/// and both variables, never the values.
#[test]
fn one_key_set_twice_with_different_casing_exits_64() {
    let out = check_config(&[
        ("IMPRINT_SYNC__API__KEY", KEY),
        ("IMPRINT_SYNC__api__key", "another-key-never-print"),
    ]);
    assert_config_error(&out, "api.key", "two casings");
    let text = output_text(&out);
    assert!(text.contains("IMPRINT_SYNC__api__key"), "{text}");
    assert!(
        !text.contains(KEY) && !text.contains("another-key"),
        "{text}"
    );
}

/// An empty `api.merchant_key` (a secret's entry missing, mounted as "") passed, and every
/// request carried an empty x-imprint-merchant-key header.
#[test]
fn an_empty_merchant_key_exits_64() {
    let out = check_config(&[("IMPRINT_SYNC__API__MERCHANT_KEY", "")]);
    assert_config_error(&out, "api.merchant_key", "empty merchant key");
}

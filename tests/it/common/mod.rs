//! The test harness: a fresh, migrated database per test, on the PostgreSQL at
//! 127.0.0.1:5432 (or `DATABASE_URL`); where none answers and a Docker engine does, one
//! started with testcontainers.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use imprint_sync::config::Settings;
use imprint_sync::db::ScratchDatabase;
use imprint_sync::engine::{Engine, EngineSettings, RunMode, Summary};
use imprint_sync::sandbox::{self, Faults, SandboxHandle};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use url::Url;

const LOCAL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database for one test; dropped when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    /// The database's name (for `pg_stat_activity` and `ALTER DATABASE`).
    pub name: String,
    /// The server's maintenance database, for statements about this one.
    pub admin_url: String,
    scratch: Option<ScratchDatabase>,
}

impl TestDb {
    /// A fresh database with the migrations applied.
    pub async fn new() -> Self {
        Self::create(true).await
    }

    /// A fresh, empty database: no schema of ours yet (for testing `migrate` itself).
    pub async fn empty() -> Self {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> Self {
        let admin = admin_url().await;
        let prefix = "imprint_sync_test";
        let scratch = if migrated {
            ScratchDatabase::create(&admin, prefix).await
        } else {
            ScratchDatabase::create_empty(&admin, prefix).await
        }
        .expect("creating the test database");
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&scratch.url)
            .await
            .expect("connecting to the test database");
        Self {
            pool,
            url: scratch.url.clone(),
            name: scratch.name.clone(),
            admin_url: admin,
            scratch: Some(scratch),
        }
    }

    /// A connection to the server's maintenance database.
    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect_with(
            &imprint_sync::db::connect_options(&self.admin_url).expect("admin url"),
        )
        .await
        .expect("connecting to the maintenance database")
    }

    /// Takes the database away as a server restart would (refuses new connections, ends the
    /// open ones) or brings it back; the server itself is shared, so it is never restarted.
    pub async fn set_available(&self, available: bool) {
        let mut admin = self.admin().await;
        let alter = format!(
            r#"ALTER DATABASE "{}" ALLOW_CONNECTIONS {available}"#,
            self.name
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
            .execute(&mut admin)
            .await
            .expect("ALTER DATABASE");
        if !available {
            self.end_sessions(&mut admin).await;
        }
    }

    /// Makes every new session of this database read-only (as after a failover to a replica:
    /// writes fail with SQLSTATE 25006), or writable again; open sessions are ended, so the
    /// change holds at once. Only this test's database is touched.
    pub async fn set_read_only(&self, read_only: bool) {
        let mut admin = self.admin().await;
        let alter = if read_only {
            format!(
                r#"ALTER DATABASE "{}" SET default_transaction_read_only = on"#,
                self.name
            )
        } else {
            format!(
                r#"ALTER DATABASE "{}" RESET default_transaction_read_only"#,
                self.name
            )
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
            .execute(&mut admin)
            .await
            .expect("ALTER DATABASE");
        self.end_sessions(&mut admin).await;
    }

    async fn end_sessions(&self, admin: &mut PgConnection) {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(admin)
        .await
        .expect("ending the database's sessions");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(scratch) = self.scratch.take() else {
            return;
        };
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        // The pool is not closed from there: its sockets belong to the test's runtime, which
        // (current-thread) is blocked right here; DROP ... WITH (FORCE) ends its sessions.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Err(e) = scratch.drop_now().await {
                    eprintln!(
                        "warning: could not drop test database {}: {e:#}",
                        scratch.name
                    );
                }
            });
        })
        .join()
        .ok();
    }
}

/// The server to create test databases on, found once per test binary.
pub async fn admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    if let Some(url) = URL.get() {
        return url.clone();
    }
    let url = find_server().await;
    URL.get_or_init(|| url).clone()
}

async fn find_server() -> String {
    let wanted = std::env::var("DATABASE_URL").unwrap_or_else(|_| LOCAL.to_owned());
    if reachable(&wanted).await {
        return wanted;
    }
    if let Some(url) = container().await {
        return url;
    }
    panic!(
        "no PostgreSQL for the tests: nothing answers at {} and no Docker engine is available. \
         Start PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres), or set DATABASE_URL \
         to a server where this user may CREATE DATABASE, or start Docker.",
        imprint_sync::config::redact_database_url(&wanted)
    );
}

async fn reachable(url: &str) -> bool {
    let Ok(opts) = imprint_sync::db::connect_options(url) else {
        return false;
    };
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .connect_with(opts)
        .await
        .is_ok()
}

/// Starts PostgreSQL in a container, kept for the life of the test binary.
async fn container() -> Option<String> {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    let has_docker = std::path::Path::new("/var/run/docker.sock").exists()
        || std::env::var_os("DOCKER_HOST").is_some();
    if !has_docker {
        return None;
    }
    let node = Postgres::default().start().await.ok()?;
    let port = node.get_host_port_ipv4(5432).await.ok()?;
    // Keep the container for the process's lifetime; it is removed when Docker reaps it.
    Box::leak(Box::new(node));
    Some(format!(
        "postgres://postgres:postgres@127.0.0.1:{port}/postgres"
    ))
}

// ---------------------------------------------------------------------------------------
// Engine harness: configuration, the in-process engine, the binary as a process, outbox
// rows and what became of them.

/// The API key every engine test uses; distinctive, so a leak into a log is found by grep.
pub const API_KEY: &str = "sk_test_Zq8wLEAKCANARY41";

/// The environment a test gives the daemon: its database and API, retries that come due
/// quickly, a rate limit that never gets in the way, and no fixed admin port.
pub fn test_env(database_url: &str, api: &Url) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url),
        ("IMPRINT_SYNC__API__BASE_URL", api.as_str()),
        ("IMPRINT_SYNC__API__KEY", API_KEY),
        ("IMPRINT_SYNC__API__TIMEOUT_MS", "3000"),
        ("IMPRINT_SYNC__API__CONNECT_TIMEOUT_MS", "1000"),
        ("IMPRINT_SYNC__SYNC__LEASE_MS", "8000"),
        ("IMPRINT_SYNC__SYNC__BACKOFF_BASE_MS", "10"),
        ("IMPRINT_SYNC__SYNC__BACKOFF_MAX_MS", "200"),
        ("IMPRINT_SYNC__SYNC__POLL_INTERVAL_MS", "200"),
        ("IMPRINT_SYNC__RATE_LIMIT__REQUESTS_PER_SECOND", "5000"),
        ("IMPRINT_SYNC__RATE_LIMIT__BURST", "500"),
        ("IMPRINT_SYNC__ADMIN__LISTEN", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `test_env` with `overrides` (`("SYNC__MAX_ATTEMPTS", "3")`: the `IMPRINT_SYNC__` prefix
/// is added) applied on top.
pub fn env_with(
    database_url: &str,
    api: &Url,
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = test_env(database_url, api);
    for (k, v) in overrides {
        let key = format!("IMPRINT_SYNC__{k}");
        env.retain(|(existing, _)| *existing != key);
        env.push((key, (*v).to_owned()));
    }
    env
}

/// The settings the daemon would load from [`env_with`].
pub fn settings(db: &TestDb, api: &Url, overrides: &[(&str, &str)]) -> Settings {
    Settings::load_from(None, env_with(&db.url, api, overrides)).expect("test settings are valid")
}

/// An engine for `run --once`, built the way `run` builds it.
pub fn engine(db: &TestDb, api: &Url, overrides: &[(&str, &str)]) -> Engine {
    let s = settings(db, api, overrides);
    engine_with(db.pool.clone(), &s, &imprint_sync::engine::worker_id())
}

/// An engine for `run --once` from `settings`, as replica `worker_id`.
pub fn engine_with(pool: PgPool, settings: &Settings, worker_id: &str) -> Engine {
    Engine::with_mode(
        pool,
        settings.client().expect("client"),
        settings.traffic(),
        EngineSettings::from_settings(settings),
        worker_id.to_owned(),
        RunMode { once: true },
    )
}

/// Runs `engine` until the outbox is drained, as `run --once` does; gives up after `limit`.
pub async fn drain(engine: &Engine, limit: Duration) -> Summary {
    tokio::time::timeout(limit, engine.run(CancellationToken::new()))
        .await
        .unwrap_or_else(|_| panic!("the engine drains the outbox within {limit:?}"))
}

/// Drains the outbox in this process, as `run --once` does; gives up after a minute.
pub async fn run_once(db: &TestDb, api: &Url, overrides: &[(&str, &str)]) -> Summary {
    drain(&engine(db, api, overrides), Duration::from_secs(60)).await
}

/// A sandbox on a free port of 127.0.0.1 that accepts [`API_KEY`].
pub async fn sandbox(faults: Faults) -> SandboxHandle {
    sandbox::spawn_local(API_KEY, faults)
        .await
        .expect("starting the sandbox")
}

/// An upper-case, UUID-like customer id, distinct per `(group, n)`.
pub fn customer_id(group: u32, n: u32) -> String {
    format!("{group:08X}-5EED-4A1B-9C0D-{n:012X}")
}

/// A valid profile change for `customer`, version `version`: the version shows in the email
/// and in `metadata.version`, so a journal tells which version was sent.
pub fn profile(customer: &str, version: u32) -> Value {
    json!({
        "customer_id": customer,
        "email": format!("v{version}.{}@example.com", customer.to_lowercase()),
        "phone": "+14155550100",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "preferred_language": "en",
        "street_line1": "1 Main St",
        "city": "Springfield",
        "state": "IL",
        "postal_code": "62701",
        "country": "USA",
        "metadata": {"version": version},
    })
}

/// The version a journal body carries (see [`profile`]).
pub fn version_of(body: &Value) -> Option<u64> {
    body.pointer("/metadata/version").and_then(Value::as_u64)
}

/// Inserts outbox rows in order (ids increase in that order); each row is a JSON object of
/// outbox columns (an `id` key sets the id). Returns the ids.
pub async fn insert(pool: &PgPool, rows: &[Value]) -> Vec<i64> {
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        for k in row.as_object().expect("a row is a JSON object").keys() {
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
            );
            if !columns.contains(&k.as_str()) {
                columns.push(k);
            }
        }
    }
    let list = columns.join(", ");
    let sql = format!(
        "INSERT INTO imprint_sync.customer_outbox ({list}) OVERRIDING SYSTEM VALUE
         SELECT {list} FROM jsonb_populate_recordset(NULL::imprint_sync.customer_outbox, $1)
              WITH ORDINALITY AS r ORDER BY ordinality
         RETURNING id"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(Value::Array(rows.to_vec()))
        .fetch_all(pool)
        .await
        .expect("inserting outbox rows")
}

/// An outbox row as a test inspects it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RowState {
    pub id: i64,
    pub customer_id: String,
    pub sync_status: String,
    pub attempts: i32,
    pub last_http_status: Option<i32>,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    pub superseded_by: Option<i64>,
}

/// Every outbox row, by id.
pub async fn rows(pool: &PgPool) -> Vec<RowState> {
    sqlx::query_as(
        "SELECT id, customer_id, sync_status, attempts, last_http_status, last_error_code,
                last_error, superseded_by
         FROM imprint_sync.customer_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("reading outbox rows")
}

/// One outbox row.
pub async fn row(pool: &PgPool, id: i64) -> RowState {
    rows(pool)
        .await
        .into_iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no outbox row {id}"))
}

/// Rows counted by `sync_status`.
pub async fn counts(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT sync_status, count(*) FROM imprint_sync.customer_outbox GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("counting rows")
    .into_iter()
    .collect()
}

/// `sync_attempts` of one row: (attempt, http_status, outcome), in order.
pub async fn attempts(pool: &PgPool, outbox_id: i64) -> Vec<(i32, Option<i32>, String)> {
    sqlx::query_as(
        "SELECT attempt, http_status, outcome FROM imprint_sync.sync_attempts
         WHERE outbox_id = $1 ORDER BY id",
    )
    .bind(outbox_id)
    .fetch_all(pool)
    .await
    .expect("reading sync_attempts")
}

/// Checks G1 and G3 over a finished run: every row synced or superseded, each customer's
/// journal holds only its newest version, no customer ever had two requests at once.
/// `newest` maps each customer to the version of its newest row.
pub async fn assert_newest_only(
    pool: &PgPool,
    sandbox: &SandboxHandle,
    newest: &BTreeMap<String, u32>,
) {
    let by_status = counts(pool).await;
    let unfinished: i64 = by_status
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "synced" | "superseded"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        unfinished, 0,
        "rows neither synced nor superseded: {by_status:?}"
    );
    assert_eq!(by_status.get("synced").copied(), Some(newest.len() as i64));
    for (customer, version) in newest {
        let journal = sandbox.journal(customer);
        assert!(!journal.is_empty(), "{customer}: nothing was sent");
        let sent: Vec<_> = journal.iter().map(version_of).collect();
        assert!(
            sent.iter().all(|v| *v == Some(u64::from(*version))),
            "{customer}: sent versions {sent:?}, newest is {version}"
        );
    }
    assert_eq!(sandbox.stats().max_concurrent_per_customer, 1, "G1");
}

/// Seeds `customers` customers with one version each.
pub async fn seed_customers(pool: &PgPool, group: u32, customers: u32) {
    let rows: Vec<Value> = (0..customers)
        .map(|n| profile(&customer_id(group, n), 1))
        .collect();
    insert(pool, &rows).await;
}

/// Seeds `customers` customers with 1 to 5 versions each (interleaved, as real changes
/// arrive); returns each customer's newest version.
pub async fn seed_versions(pool: &PgPool, group: u32, customers: u32) -> BTreeMap<String, u32> {
    let newest: BTreeMap<String, u32> = (0..customers)
        .map(|n| (customer_id(group, n), n % 5 + 1))
        .collect();
    let mut batch = Vec::new();
    for version in 1..=5 {
        for (customer, last) in &newest {
            if version <= *last {
                batch.push(profile(customer, version));
            }
        }
    }
    insert(pool, &batch).await;
    newest
}

/// The built binary, started with a clean environment; output goes to files (a pipe
/// nobody reads would block a chatty daemon).
pub struct Daemon {
    child: tokio::process::Child,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl Daemon {
    pub fn start(args: &[&str], env: &[(String, String)]) -> Self {
        let stdout = tempfile::NamedTempFile::new().expect("temp file");
        let stderr = tempfile::NamedTempFile::new().expect("temp file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imprint-sync"))
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(stdout.reopen().expect("stdout file"))
            .stderr(stderr.reopen().expect("stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("starting imprint-sync");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon is running")
    }

    /// Waits for the exit code; fails the test after `secs` seconds.
    pub async fn exit_code(&mut self, secs: u64) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(secs), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "imprint-sync still running after {secs} s; stderr:\n{}",
                    self.stderr()
                )
            })
            .expect("waiting for imprint-sync");
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status:?}"))
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout.path()).expect("reading stdout")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).expect("reading stderr")
    }
}

/// Polls `check` every 50 ms until it holds; fails the test after `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the built `imprint-sync` binary with exactly the given environment (plus PATH), so
/// nothing from the developer's shell leaks into what is tested.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    binary_command(args, env)
        .output()
        .expect("running the imprint-sync binary")
}

/// The `imprint-sync` command with a clean environment, for tests that spawn it themselves.
pub fn binary_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imprint-sync"));
    cmd.args(args).env_clear().envs(env.iter().copied());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// The process's stdout and stderr together, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The admin server's address, from the daemon's "admin server listening" log line (the
/// tests let it bind 127.0.0.1:0, so no port can be taken by someone else first).
pub async fn admin_addr(daemon: &Daemon) -> std::net::SocketAddr {
    let mut found = None;
    eventually(30, "the daemon logs its admin address", || {
        found = daemon
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v.get("admin")?.as_str()?.parse().ok());
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("admin address")
}

/// A 400 outcome of a claimed row, as the worker would record it (`claim` is the row's
/// `lease_expires_at`).
pub fn refused(
    id: i64,
    customer: &str,
    claim: Option<chrono::DateTime<chrono::Utc>>,
) -> imprint_sync::outbox::record::Record {
    imprint_sync::outbox::record::Record {
        id,
        customer_id: customer.to_owned(),
        disposition: imprint_sync::outbox::record::Disposition::Failed { counts: true },
        http_status: Some(400),
        error_code: Some("INVALID_REQUEST_ERROR".into()),
        error: Some("email: refused".into()),
        claim,
        hold: None,
        attempts: vec![],
    }
}

/// One expression over a customer's `customer_sync_state` row (e.g. `"accepted"`,
/// `"response->>'first_name'"`); panics when the customer has no row.
pub async fn sync_state<T>(pool: &PgPool, customer: &str, expr: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let sql = format!("SELECT {expr} FROM imprint_sync.customer_sync_state WHERE customer_id = $1");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(customer)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("customer {customer}: reading {expr} of its sync state: {e}"))
}

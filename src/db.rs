//! The connection pool and the embedded migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::{ConfigError, DB_URL_FILE_PARAMS, DB_URL_KEY, DatabaseSettings};

/// Largest certificate or key file `database.url` may name (a CA bundle is a few hundred KB).
const MAX_CERT_FILE_BYTES: u64 = 1024 * 1024;

/// TCP keepalives the server applies to our connections (seconds, seconds, probes): a
/// daemon that vanished without closing its sockets is noticed within about a minute.
const SERVER_KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
];

/// The schema every table of ours lives in.
pub const SCHEMA: &str = "imprint_sync";

/// The embedded migrations; their bookkeeping table lives in our schema, so a partner's own
/// sqlx migrations in the same database never collide with ours.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.create_schema(SCHEMA);
    m.dangerous_set_table_name("imprint_sync._sqlx_migrations");
    m
}

/// Connect options for a URL, with statement logging turned down (statements carry values).
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    install_tls_provider();
    let opts: PgConnectOptions = url.parse().context("parsing database.url")?;
    Ok(opts
        .application_name("imprint-sync")
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(2)))
}

/// Makes aws-lc-rs the process's TLS crypto provider. sqlx's `sslmode=verify-ca` path asks
/// rustls for the process default, which rustls cannot pick once both of its providers are
/// compiled in (any crate enabling `ring` does that, as the test build does): it panicked
/// at the first connection, exit 101. Idempotent: a provider already installed stays.
pub fn install_tls_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The certificate files `database.url` names must be readable where the daemon runs: sqlx
/// would report a missing one as an I/O error, which looks transient and is retried forever.
/// Checked when connecting, not by `check-config`, which may run on another machine.
fn check_url_files(url: &str) -> Result<(), ConfigError> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    for (name, value) in parsed.query_pairs() {
        if DB_URL_FILE_PARAMS.contains(&&*name) {
            // A directory passed File::open and then failed every connection as an I/O
            // error (retried for ever); /dev/zero was read until out of memory.
            crate::config::open_small_file(std::path::Path::new(&*value), MAX_CERT_FILE_BYTES)
                .map_err(|why| ConfigError::new(DB_URL_KEY, format!("{name}: {why}")))?;
        }
    }
    Ok(())
}

/// The pool of `run` and `status`. Every connection carries a `statement_timeout`, a
/// `lock_timeout`, `jit = off` and server-side TCP keepalives (sqlx 0.9 has no client-side keepalive
/// option). It connects lazily: a database that is down at start is waited for, not fatal.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let statement = settings.statement_timeout_ms.to_string();
    let lock = settings.lock_timeout_ms.to_string();
    // A transaction whose client went silent (a call cut off by its deadline on a
    // black-holed connection) is ended by the server, so its row locks do not keep those
    // customers from every later claim until the server's keepalive notices.
    let idle = call_deadline(settings).as_millis().to_string();
    let session = [
        ("statement_timeout", statement.as_str()),
        ("lock_timeout", lock.as_str()),
        ("idle_in_transaction_session_timeout", idle.as_str()),
        // Short statements run by the thousand: compiling one costs far more than it saves
        // (the claim's merge took ~300 ms of JIT per claim on a server with `jit = on`).
        ("jit", "off"),
    ];
    check_url_files(&settings.url)?;
    let opts = connect_options(&settings.url)?
        .options(session)
        .options(SERVER_KEEPALIVES);
    Ok(pool_options(settings).connect_lazy_with(opts))
}

/// How long one lock request of `migrate` may wait before it is withdrawn and made again.
/// A waiting ALTER TABLE queues every later insert behind it: without this, a partner
/// transaction left open stalled all of the partner's writes to the outbox.
const MIGRATION_LOCK_TIMEOUT: &str = "3s";

/// The pool of `migrate`: no statement timeout, since a migration may scan a large table;
/// a short lock timeout, retried by [`migrate_waiting`].
pub fn migration_pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    check_url_files(&settings.url)?;
    let opts = connect_options(&settings.url)?
        .options([("lock_timeout", MIGRATION_LOCK_TIMEOUT)])
        .options(SERVER_KEEPALIVES);
    Ok(pool_options(settings).connect_lazy_with(opts))
}

/// `imprint-sync migrate`: applies the migrations, trying again (on a fresh connection)
/// whenever a lock was not granted in time: a table another transaction holds, or the
/// advisory lock while another replica migrates. Every migration may run again from its
/// start, so a try given up half way is finished by the next.
pub async fn migrate_waiting(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(500);
    loop {
        let pool = migration_pool(settings)?;
        let result = migrate(&pool).await;
        pool.close().await;
        match result {
            Err(e) if lock_not_granted(&e) => {
                tracing::warn!(
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "a migration waited longer than {MIGRATION_LOCK_TIMEOUT} for a lock (an open transaction on the table, or another replica migrating); trying again"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
}

/// A lock not granted within `lock_timeout` (55P03).
fn lock_not_granted(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<sqlx::Error>())
        .any(|s| s.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03"))
}

fn pool_options(settings: &DatabaseSettings) -> PgPoolOptions {
    let limit = call_deadline(settings);
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .after_release(move |conn, _| {
            Box::pin(async move {
                // A call cut off by its deadline (see `within`) leaves its connection mid-
                // statement, perhaps black-holed; sqlx then pings it before reuse with no
                // time limit, holding a pool slot for as long as the OS keeps the socket
                // (minutes). Pinged here with a limit instead, a connection that does not
                // answer is dropped, not returned to the pool.
                match tokio::time::timeout(limit, sqlx::Connection::ping(conn)).await {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(no_answer(limit)),
                }
            })
        })
}

/// How long one engine call (claim, write-back, rescue, heartbeat) may take before the
/// connection is given up: the server's `statement_timeout` and a margin for the round trip
/// and acquiring a connection. sqlx 0.9 has no client-side TCP keepalive, so without it a
/// black-holed connection waits for the OS (minutes).
pub fn call_deadline(settings: &DatabaseSettings) -> Duration {
    Duration::from_millis(settings.statement_timeout_ms.saturating_add(CALL_MARGIN_MS))
}

const CALL_MARGIN_MS: u64 = 2_000;

/// Runs a database call with a deadline; a call that passes it is an I/O error (transient:
/// the database is treated as unavailable and the call is made again on another connection).
pub async fn within<T>(
    limit: Duration,
    call: impl Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(no_answer(limit)))
}

fn no_answer(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from the database within {} ms",
            limit.as_millis()
        ),
    ))
}

/// A database error that no wait will cure, met at start: TLS (a certificate that does not
/// verify, a server without TLS under `sslmode=require`) or a URL sqlx refuses. It is the
/// configuration's fault, so it exits 64 naming `database.url`.
pub fn config_error(e: &anyhow::Error) -> Option<ConfigError> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<sqlx::Error>())
        .find_map(|e| {
            let tls = |why: &dyn std::fmt::Display| {
                ConfigError::new(
                    DB_URL_KEY,
                    format!("TLS with the database failed: {why} (check sslmode and sslrootcert)"),
                )
            };
            match e {
                sqlx::Error::Tls(why) => Some(tls(why)),
                // A certificate refused during the handshake comes as an I/O error whose
                // cause is rustls's.
                sqlx::Error::Io(io) => io
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .map(|why| tls(why)),
                sqlx::Error::Configuration(c) => Some(ConfigError::new(DB_URL_KEY, c.to_string())),
                _ => None,
            }
        })
}

/// A pool for a one-shot command (`status`, `failed`, `history`): connects now, so a
/// database that is down is named with the real error (refused, unknown host, bad password)
/// rather than a pool timeout behind a query.
pub async fn connect_now(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    // One plain connection first: a pool retries until its timeout and then reports only
    // that it timed out. The certificate files first, so a missing one exits 64 here too.
    check_url_files(&settings.url)?;
    let conn = connect_options(&settings.url)?
        .connect()
        .await
        .with_context(|| {
            format!(
                "connecting to the database at {} (database.url)",
                crate::config::redact_database_url(&settings.url)
            )
        })?;
    // The probe has done its work; a one-shot command's queries go through the pool.
    let _ = sqlx::Connection::close(conn).await;
    pool(settings)
}

/// The database is away or busy, not refusing the data: connection failures (08), a server
/// starting up or shutting down, or a statement cancelled by `statement_timeout` (57),
/// resources (53), a rolled-back transaction (40), a lock not granted within `lock_timeout`
/// (55P03), or no answer at all. Waited out with backoff; anything else is a real error.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        _ => e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| {
                c == "55P03"
                    || ["08", "40", "53", "57"]
                        .iter()
                        .any(|class| c.starts_with(class))
            }),
    }
}

/// Applies the migrations (idempotent; serialized across processes by an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    migrator()
        .run(pool)
        .await
        .context("applying the imprint_sync migrations")
}

/// Checks that every embedded migration is applied, for `run` (which never migrates itself
/// unless asked: the schema belongs to `imprint-sync migrate`).
pub async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM imprint_sync._sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .context("reading imprint_sync._sqlx_migrations (run `imprint-sync migrate` first)")?;
    let missing: Vec<i64> = migrator()
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "migrations {missing:?} are not applied: run `imprint-sync migrate`"
    );
    Ok(())
}

/// A throwaway database (the demo, the benchmark and every test use one): created empty
/// beside the one `admin_url` points at, migrated, and dropped by [`ScratchDatabase::drop_now`].
pub struct ScratchDatabase {
    /// URL of the scratch database.
    pub url: String,
    pub name: String,
    admin: PgConnectOptions,
}

impl ScratchDatabase {
    /// Creates and migrates a fresh database named `{prefix}_{random}`.
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let db = Self::create_empty(admin_url, prefix).await?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(connect_options(&db.url)?)
            .await?;
        migrate(&pool).await?;
        pool.close().await;
        Ok(db)
    }

    /// Creates a fresh, empty database named `{prefix}_{random}` (not migrated).
    pub async fn create_empty(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        use sqlx::Executor;
        // Creating and dropping a database can take seconds on a busy server: that is no
        // "slow statement" worth a warning on the demo's screen.
        let admin = connect_options(admin_url)?
            .log_slow_statements(log::LevelFilter::Off, Duration::from_secs(60));
        let name = format!("{prefix}_{:016x}", rand::random::<u64>());
        let mut conn = admin.connect().await.with_context(|| {
            format!(
                "connecting to {}",
                crate::config::redact_database_url(admin_url)
            )
        })?;
        // The name is ours (prefix and hex), never user input.
        let create = format!(r#"CREATE DATABASE "{name}""#);
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(create)))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let mut url = url::Url::parse(admin_url).context("parsing the database URL")?;
        url.set_path(&name);
        Ok(Self {
            url: url.to_string(),
            name,
            admin,
        })
    }

    /// Drops the database, disconnecting whoever is still on it.
    pub async fn drop_now(&self) -> anyhow::Result<()> {
        use sqlx::Executor;
        let mut conn = self.admin.connect().await?;
        let drop = format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name);
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(drop)))
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        Ok(())
    }
}

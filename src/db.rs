//! The connection pool and the embedded migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::DatabaseSettings;

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
    let opts: PgConnectOptions = url.parse().context("parsing database.url")?;
    Ok(opts
        .application_name("imprint-sync")
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(2)))
}

/// A pool that connects lazily: a database that is down at start is waited for, not fatal.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(connect_options(&settings.url)?))
}

/// A pool for a one-shot command (`status`, `failed`, `history`): connects now, so a
/// database that is down is named with the real error (refused, unknown host, bad password)
/// rather than a pool timeout behind a query.
pub async fn connect_now(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    // One plain connection first: a pool retries until its timeout and then reports only
    // that it timed out.
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
/// starting up or shutting down (57), resources (53), a rolled-back transaction (40), or no
/// answer at all. Waited out with backoff; anything else is a real error.
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
                ["08", "40", "53", "57"]
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
        let admin = connect_options(admin_url)?;
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

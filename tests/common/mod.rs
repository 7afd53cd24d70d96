//! The test harness: a fresh, migrated database per test, on the PostgreSQL at
//! 127.0.0.1:5432 (or `DATABASE_URL`); where none answers and a Docker engine does, one
//! started with testcontainers.
#![allow(dead_code)]

use std::sync::OnceLock;

use imprint_sync::db::ScratchDatabase;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const LOCAL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database for one test; dropped when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    scratch: Option<ScratchDatabase>,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin = admin_url().await;
        let scratch = ScratchDatabase::create(&admin, "imprint_sync_test")
            .await
            .expect("creating the test database");
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&scratch.url)
            .await
            .expect("connecting to the test database");
        Self {
            pool,
            url: scratch.url.clone(),
            scratch: Some(scratch),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(scratch) = self.scratch.take() else {
            return;
        };
        let pool = self.pool.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                pool.close().await;
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
async fn admin_url() -> String {
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

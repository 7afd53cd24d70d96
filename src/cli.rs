//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keeps Imprint's copy of a partner's customers in step with the partner's outbox.
#[derive(Debug, Parser)]
#[command(name = "imprint-sync", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML), layered over the defaults and under the environment.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: work the outbox until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Counts by state, oldest pending age, failures by error code, last sync time.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load and validate the configuration; print it with secrets redacted.
    CheckConfig,
    /// A local emulator of the Imprint API, for tests and local development.
    Sandbox(SandboxArgs),
    /// A first run: throwaway database, in-process sandbox, seeded changes, a summary.
    Demo(DemoArgs),
    /// Compare Imprint's copy of customers with the partner's newest synced profile (exit 0:
    /// all in step; 1: drift or missing found; 2: the key was rejected).
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Args, Clone, Default)]
pub struct ReconcileArgs {
    /// Check this customer (Imprint's id); repeatable. Default: every customer, least
    /// recently checked first.
    #[arg(long, value_name = "ID")]
    pub customer: Vec<String>,
    /// Check at most N customers.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Only customers synced within this long: 90s, 15m, 24h, 7d.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Enqueue an outbox row with the partner's newest profile for each drifted customer.
    #[arg(long)]
    pub repair: bool,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// Work until nothing is due, then exit (0: no row failed in this run; 1: some did).
    #[arg(long)]
    pub once: bool,
    /// First put failed rows back to pending (newest per customer), then run.
    #[arg(long)]
    pub replay_failed: bool,
    /// Map and validate due rows, print what would be sent; change and send nothing.
    #[arg(long, conflicts_with = "replay_failed")]
    pub dry_run: bool,
}

#[derive(Debug, Args, Clone)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// The bearer key the sandbox accepts.
    #[arg(long, env = "IMPRINT_SANDBOX_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Added latency per request (ms).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of requests answered 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Requests per second beyond which the sandbox answers 429 with Retry-After.
    #[arg(long)]
    pub rate_limit: Option<f64>,
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Profile changes to seed.
    #[arg(long, default_value_t = 2_000)]
    pub rows: u32,
    /// Keep the throwaway database instead of dropping it.
    #[arg(long)]
    pub keep: bool,
}

//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::outbox::dead_letters::Binds;
use crate::sandbox;

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
    Status(StatusArgs),
    /// Failed rows (dead letters), newest first: id, customer, error code and message.
    Failed(FailedArgs),
    /// One customer's story: its outbox rows, its attempts and its sync state.
    History {
        /// The customer's id (Imprint's UUID, as in the outbox).
        customer_id: String,
        /// Show the newest N outbox rows (and their attempts); `rows_total` counts them all.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Load and validate the configuration; print it with secrets redacted.
    CheckConfig,
    /// A local emulator of the Imprint API, for tests and local development.
    Sandbox(SandboxArgs),
    /// A first run: throwaway database, in-process sandbox, seeded changes, a summary.
    Demo(DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `imprint-sync man > imprint-sync.1`.
    Man,
    /// Compare Imprint's copy of customers with the partner's newest synced profile (exit 0:
    /// all in step; 1: drift or missing found; 2: the key was rejected).
    Reconcile(ReconcileArgs),
}

/// Which failed rows a command works on. Every given filter must hold; a repeated filter
/// matches any of its values.
#[derive(Debug, Args, Clone, Default, PartialEq)]
pub struct FailedFilter {
    /// Only rows failed with this error code (repeatable), e.g. CUSTOMER_NOT_FOUND_ERROR.
    #[arg(long = "code", value_name = "CODE")]
    pub codes: Vec<String>,
    /// Only rows of this customer (repeatable).
    #[arg(long = "customer", value_name = "ID")]
    pub customers: Vec<String>,
    /// Only rows that failed within this long, e.g. 90s, 30m, 6h, 2d.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<std::time::Duration>,
}

impl FailedFilter {
    /// True when no filter is given.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The filter as the outbox binds it, with these outbox ids (none: any id).
    pub fn binds(&self, ids: &[i64]) -> Binds {
        let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Binds {
            codes: some(&self.codes),
            customers: some(&self.customers),
            since_seconds: self.since.map(|d| d.as_secs_f64()),
            ids: (!ids.is_empty()).then(|| ids.to_vec()),
        }
    }
}

/// A duration as operators type it: a whole number and a unit (s, m, h or d).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, e.g. 30m"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(
        n.saturating_mul(unit_secs).min(LONGEST_WINDOW_SECS),
    ))
}

/// The longest `--since` window, 1000 years: longer means "everything", and PostgreSQL cannot
/// compute `now()` minus more than about 6700 years (it refused the query, which then blamed
/// an unmigrated schema).
pub const LONGEST_WINDOW_SECS: u64 = 1_000 * 365 * 86_400;

#[derive(Debug, Args, Clone, Default)]
pub struct FailedArgs {
    #[command(flatten)]
    pub filter: FailedFilter,
    /// Show at most this many rows (the total still counts every match).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A `status --check` age threshold: finite and not negative. NaN or infinity never breach
/// (a probe that can never fail), a negative one always does.
fn parse_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?}: expected a number of seconds, 0 or more")),
    }
}

#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 when every given threshold holds, 1 naming each breach (cron, monit, probes).
    #[arg(long)]
    pub check: bool,
    /// With --check: the oldest pending row may be at most this old (seconds).
    #[arg(long, value_name = "SECONDS", requires = "check", value_parser = parse_threshold)]
    pub max_oldest_pending: Option<f64>,
    /// With --check: at most this many failed rows.
    #[arg(long, value_name = "N", requires = "check", value_parser = clap::value_parser!(i64).range(0..))]
    pub max_failed: Option<i64>,
    /// With --check: at least this many live replicas.
    #[arg(long, value_name = "N", requires = "check")]
    pub min_replicas: Option<usize>,
    /// Redraw the table every SECONDS (default 2) until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
          conflicts_with_all = ["check", "json"])]
    pub watch: Option<u64>,
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
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<std::time::Duration>,
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
    /// Map and validate due rows, print what would be sent; change and send nothing. With
    /// --replay-failed: list the rows that would be put back.
    #[arg(long)]
    pub dry_run: bool,
    /// With --replay-failed: which customers' failed rows go back (their newest failed row
    /// must match).
    #[command(flatten)]
    pub filter: FailedFilter,
    /// With --replay-failed: only these outbox ids, e.g. 12,15,40.
    #[arg(long, value_name = "ID,...", value_delimiter = ',')]
    pub ids: Vec<i64>,
}

impl RunArgs {
    /// The replay filters were given without --replay-failed (they would do nothing).
    pub fn stray_filter(&self) -> bool {
        !self.replay_failed && (!self.filter.is_empty() || !self.ids.is_empty())
    }
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

impl From<SandboxArgs> for sandbox::Options {
    fn from(args: SandboxArgs) -> Self {
        Self {
            listen: args.listen,
            api_key: args.api_key,
            faults: sandbox::Faults {
                latency_ms: args.latency_ms,
                fail_rate: args.fail_rate,
                rate_limit: args.rate_limit,
                ..sandbox::Faults::default()
            },
        }
    }
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

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "imprint-sync", out);
}

/// Writes the man page (roff): the options and the list of subcommands.
pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(out)
}

/// Parses the command line; a usage error exits 64 (EX_USAGE), never clap's 2, which means
/// "the API key was rejected" here. `--help` and `--version` print and exit 0.
pub fn parse() -> Result<Cli, std::process::ExitCode> {
    use clap::Parser;
    Cli::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            std::process::ExitCode::from(crate::exit::USAGE)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_duration_takes_a_number_and_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(
            parse_duration("3000000d"),
            Ok(Duration::from_secs(LONGEST_WINDOW_SECS))
        );
        for bad in ["", "h", "24", "24x", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

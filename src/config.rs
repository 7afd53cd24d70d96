//! Configuration: built-in defaults <- `config/default.toml` <- `--config FILE` <- environment.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::imprint::{Client, ClientSettings};
use crate::telemetry::LogSettings;
use crate::traffic::{Traffic, TrafficSettings};

/// The shipped defaults file, also the built-in defaults (a test keeps them equal).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem: which key, and what is wrong with it. Exits 64.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub api: ApiSettings,
    pub sync: SyncSettings,
    pub rate_limit: RateLimitSettings,
    pub retention: RetentionSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub privacy: PrivacySettings,
    pub reconcile: ReconcileSettings,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    #[serde(serialize_with = "redact_url_password")]
    pub url: String,
    pub max_connections: u32,
    /// Longest a statement may run before the server cancels it (ms).
    pub statement_timeout_ms: u64,
    /// Longest a statement may wait for a lock before the server gives up (ms).
    pub lock_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub base_url: String,
    #[serde(default, serialize_with = "redact_secret")]
    pub key: Option<SecretString>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default, serialize_with = "redact_secret")]
    pub merchant_key: Option<SecretString>,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub allow_insecure_http: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    pub batch_size: u32,
    pub concurrency: u32,
    pub poll_interval_ms: u64,
    pub lease_ms: u64,
    pub max_attempts: u32,
    /// Claims of a row that never came back (the process died or lost the lease) before it
    /// is set aside as `failed` / `poison_row`.
    pub max_claims: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_second: f64,
    pub burst: u32,
    pub max_retry_after_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub synced_days: u32,
    pub attempts_days: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    pub store_sensitive_response_fields: bool,
}

/// `[reconcile]`: the continuous sweep inside `run`, and the share of the rate that
/// reconciliation reads may take (the sweep and `imprint-sync reconcile` alike).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// How often the sweep in `run` takes its next customers (ms); 0 turns the sweep off.
    pub interval_ms: u64,
    /// Every customer is checked about once per this period (hours).
    pub period_hours: f64,
    /// Customers per tick; 0 derives the amount from the period and the customer count.
    pub customers_per_tick: u32,
    /// The largest share of `rate_limit.requests_per_second` that reconciliation reads take.
    pub max_share: f64,
}

impl ReconcileSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let hours = self.period_hours;
        if !(hours.is_finite() && hours > 0.0 && hours <= 8_760.0) {
            return Err(ConfigError::new(
                "reconcile.period_hours",
                "must be a number of hours greater than 0 and at most 8760 (a year)",
            ));
        }
        // Above these a value is a unit mistake (as the other sections' upper bounds).
        if self.interval_ms > 3_600_000 {
            return Err(ConfigError::new(
                "reconcile.interval_ms",
                "must be at most 3600000",
            ));
        }
        if self.customers_per_tick > 1_000_000 {
            return Err(ConfigError::new(
                "reconcile.customers_per_tick",
                "must be at most 1000000",
            ));
        }
        let share = self.max_share;
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::new(
                "reconcile.max_share",
                "must be a share of the rate above 0 and at most 1 (e.g. 0.2)",
            ));
        }
        Ok(())
    }

    /// The period as a duration.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(self.period_hours * 3_600.0)
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_database_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("lock_timeout_ms", &self.lock_timeout_ms)
            .finish()
    }
}

/// Least margin between the request timeout and the lease: a live worker never loses its lease.
pub const LEASE_MARGIN_MS: u64 = 5_000;

/// Lowest `rate_limit.requests_per_second` accepted: the limiter's floor, below which a
/// smaller value was silently raised to it.
pub const MIN_REQUESTS_PER_SECOND: f64 = 0.001;

/// Highest `rate_limit.requests_per_second` accepted.
pub const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;

/// What the command about to run needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Sends requests: the API key must be present.
    ApiKey,
    /// Talks only to the database (or nothing).
    Nothing,
}

impl Settings {
    /// Loads the layered configuration from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads the layered configuration with the given environment (tests pass their own).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        use config::{Config, Environment, File, FileFormat};

        let env: config::Map<String, String> = env.into_iter().collect();
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        let shipped = Path::new("config/default.toml");
        if shipped.is_file() {
            builder = builder.add_source(File::from(shipped).format(FileFormat::Toml));
        }
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist", file.display()),
                ));
            }
            builder = builder.add_source(File::from(file).format(FileFormat::Toml));
        }
        // DATABASE_URL is a source of its own just below the prefixed variables, so it beats
        // the files and IMPRINT_SYNC__DATABASE__URL beats it (an override would beat all).
        if let Some(url) = env.get("DATABASE_URL").filter(|u| !u.is_empty()) {
            let mapped = config::Map::from([("DATABASE__URL".to_owned(), url.clone())]);
            builder =
                builder.add_source(Environment::default().separator("__").source(Some(mapped)));
        }
        let prefixed: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("IMPRINT_SYNC__"))
            .collect();
        refuse_case_twins(prefixed.keys())?;
        builder = builder.add_source(
            Environment::with_prefix("IMPRINT_SYNC")
                .prefix_separator("__")
                .separator("__")
                .source(Some(prefixed)),
        );
        let raw = builder.build().map_err(config_crate_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(config_crate_error)?;
        settings.read_key_file()?;
        settings.validate()?;
        Ok(settings)
    }

    fn read_key_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.api.key_file else {
            return Ok(());
        };
        if self.api.key.is_some() {
            return Err(ConfigError::new(
                "api.key_file",
                "set either api.key or api.key_file, not both",
            ));
        }
        let text = read_small_file(path, MAX_KEY_FILE_BYTES)
            .map_err(|why| ConfigError::new("api.key_file", why))?;
        let key = text.trim_end_matches(['\r', '\n']);
        if key.is_empty() {
            return Err(ConfigError::new(
                "api.key_file",
                format!("{} is empty", path.display()),
            ));
        }
        let key = SecretString::from(key.to_owned());
        header_safe("api.key_file", Some(&key))?;
        self.api.key = Some(key);
        Ok(())
    }

    /// Cross-field rules, checked once at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.base_url()?;
        self.admin_listen()?;
        check_database_url(&self.database.url)?;
        self.within_bounds()?;
        let positive: [(&str, u64); 14] = [
            (
                "database.max_connections",
                self.database.max_connections.into(),
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
            ),
            ("database.lock_timeout_ms", self.database.lock_timeout_ms),
            ("api.timeout_ms", self.api.timeout_ms),
            ("api.connect_timeout_ms", self.api.connect_timeout_ms),
            ("sync.batch_size", self.sync.batch_size.into()),
            ("sync.concurrency", self.sync.concurrency.into()),
            ("sync.poll_interval_ms", self.sync.poll_interval_ms),
            ("sync.lease_ms", self.sync.lease_ms),
            ("sync.max_attempts", self.sync.max_attempts.into()),
            ("sync.backoff_base_ms", self.sync.backoff_base_ms),
            ("sync.backoff_max_ms", self.sync.backoff_max_ms),
            ("rate_limit.burst", self.rate_limit.burst.into()),
            (
                "rate_limit.max_retry_after_ms",
                self.rate_limit.max_retry_after_ms,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if !(1..=1000).contains(&self.sync.max_claims) {
            return Err(ConfigError::new(
                "sync.max_claims",
                "must be between 1 and 1000",
            ));
        }
        let rps = self.rate_limit.requests_per_second;
        if !(rps.is_finite() && (MIN_REQUESTS_PER_SECOND..=MAX_REQUESTS_PER_SECOND).contains(&rps))
        {
            return Err(ConfigError::new(
                "rate_limit.requests_per_second",
                format!(
                    "must be a number from {MIN_REQUESTS_PER_SECOND} to {MAX_REQUESTS_PER_SECOND}"
                ),
            ));
        }
        if self.sync.backoff_max_ms < self.sync.backoff_base_ms {
            return Err(ConfigError::new(
                "sync.backoff_max_ms",
                "must be at least sync.backoff_base_ms",
            ));
        }
        if self.api.connect_timeout_ms > self.api.timeout_ms {
            return Err(ConfigError::new(
                "api.connect_timeout_ms",
                "must not exceed api.timeout_ms",
            ));
        }
        // Checked: the bounds above keep the sum small, but a sum that wrapped would pass.
        if self
            .api
            .timeout_ms
            .checked_add(LEASE_MARGIN_MS)
            .is_none_or(|least| self.sync.lease_ms < least)
        {
            return Err(ConfigError::new(
                "sync.lease_ms",
                format!(
                    "must exceed api.timeout_ms ({}) by at least {LEASE_MARGIN_MS} ms, so a live worker never loses its lease mid-request",
                    self.api.timeout_ms
                ),
            ));
        }
        self.reconcile.validate()?;
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::new("log.level", "must not be empty"));
        }
        check_log_level(&self.log.level)?;
        // An empty merchant key (a secret's missing entry, mounted as "") was sent as an
        // empty header on every request.
        for (name, secret) in [
            ("api.key", &self.api.key),
            ("api.merchant_key", &self.api.merchant_key),
        ] {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose_secret().trim().is_empty())
            {
                return Err(ConfigError::new(name, "is empty"));
            }
        }
        // Both travel in an HTTP header: a newline or a control character would pass here and
        // fail every request at `run`.
        header_safe("api.key", self.api.key.as_ref())?;
        header_safe("api.merchant_key", self.api.merchant_key.as_ref())?;
        Ok(())
    }

    /// Upper bounds: above them a value is a unit mistake, and the arithmetic on it (ms to a
    /// database interval, lease deadlines, permits) would overflow.
    fn within_bounds(&self) -> Result<(), ConfigError> {
        const HOUR_MS: u64 = 3_600_000;
        const DAY_MS: u64 = 24 * HOUR_MS;
        let bounded: [(&str, u64, u64); 17] = [
            (
                "database.max_connections",
                self.database.max_connections.into(),
                1_000,
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
                DAY_MS,
            ),
            (
                "database.lock_timeout_ms",
                self.database.lock_timeout_ms,
                DAY_MS,
            ),
            ("api.timeout_ms", self.api.timeout_ms, HOUR_MS),
            (
                "api.connect_timeout_ms",
                self.api.connect_timeout_ms,
                HOUR_MS,
            ),
            ("sync.batch_size", self.sync.batch_size.into(), 10_000),
            ("sync.concurrency", self.sync.concurrency.into(), 10_000),
            ("sync.poll_interval_ms", self.sync.poll_interval_ms, HOUR_MS),
            ("sync.lease_ms", self.sync.lease_ms, DAY_MS),
            ("sync.max_attempts", self.sync.max_attempts.into(), 1_000),
            ("sync.backoff_base_ms", self.sync.backoff_base_ms, DAY_MS),
            ("sync.backoff_max_ms", self.sync.backoff_max_ms, 7 * DAY_MS),
            (
                "sync.shutdown_grace_ms",
                self.sync.shutdown_grace_ms,
                HOUR_MS,
            ),
            ("rate_limit.burst", self.rate_limit.burst.into(), 1_000_000),
            (
                "rate_limit.max_retry_after_ms",
                self.rate_limit.max_retry_after_ms,
                DAY_MS,
            ),
            (
                "retention.synced_days",
                self.retention.synced_days.into(),
                36_500,
            ),
            (
                "retention.attempts_days",
                self.retention.attempts_days.into(),
                36_500,
            ),
        ];
        for (key, value, max) in bounded {
            if value > max {
                return Err(ConfigError::new(key, format!("must be at most {max}")));
            }
        }
        Ok(())
    }

    /// Rules that depend on the command: a command that sends needs a key.
    pub fn require(&self, needs: Needs) -> Result<(), ConfigError> {
        if needs == Needs::ApiKey && self.api.key.is_none() {
            return Err(ConfigError::new(
                "api.key",
                "is required to send requests: set IMPRINT_SYNC__API__KEY or api.key_file",
            ));
        }
        Ok(())
    }

    /// The API base URL, checked: it parses, and is https unless loopback or explicitly allowed.
    pub fn base_url(&self) -> Result<Url, ConfigError> {
        let key = "api.base_url";
        let url = Url::parse(&self.api.base_url)
            .map_err(|e| ConfigError::new(key, format!("not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.api.allow_insecure_http || is_loopback(&url) => {}
            "http" => {
                return Err(ConfigError::new(
                    key,
                    "must be https (plain http is allowed only for a loopback address or with api.allow_insecure_http = true)",
                ));
            }
            other => {
                return Err(ConfigError::new(
                    key,
                    format!("scheme `{other}` is not http or https"),
                ));
            }
        }
        if url.host().is_none() {
            return Err(ConfigError::new(key, "has no host"));
        }
        // Credentials belong in api.key, never in a URL that is printed and logged.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::new(
                key,
                "must not hold a user name or password (put the key in api.key or api.key_file)",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::new(
                key,
                "must not have a query string or fragment (put the key in api.key or api.key_file)",
            ));
        }
        Ok(url)
    }

    /// The admin server's address.
    pub fn admin_listen(&self) -> Result<SocketAddr, ConfigError> {
        self.admin.listen.parse().map_err(|e| {
            ConfigError::new(
                "admin.listen",
                format!("not a socket address (host:port): {e}"),
            )
        })
    }

    /// The Imprint client, as configured (the key must be present).
    pub fn client(&self) -> Result<Client, ConfigError> {
        let key = self
            .api
            .key
            .clone()
            .ok_or_else(|| ConfigError::new("api.key", "is required to send requests"))?;
        Client::new(ClientSettings {
            base_url: self.base_url()?,
            key,
            merchant_key: self.api.merchant_key.clone(),
            timeout: Duration::from_millis(self.api.timeout_ms),
            connect_timeout: Duration::from_millis(self.api.connect_timeout_ms),
            pool_size: self.sync.concurrency as usize,
            max_retry_after: Duration::from_millis(self.rate_limit.max_retry_after_ms),
        })
        .map_err(|e| ConfigError::new(e.key, e.message))
    }

    /// Traffic control at the configured rate.
    pub fn traffic(&self) -> Arc<Traffic> {
        Traffic::new(TrafficSettings {
            requests_per_second: self.rate_limit.requests_per_second,
            burst: self.rate_limit.burst,
        })
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(settings: &Settings) -> String {
    // serde_json -> config's TOML writer is not exposed, so render by section by hand.
    let value = serde_json::to_value(settings).expect("settings serialize");
    let mut out = String::new();
    if let serde_json::Value::Object(sections) = value {
        for (section, keys) in sections {
            out.push_str(&format!("[{section}]\n"));
            if let serde_json::Value::Object(keys) = keys {
                for (key, v) in keys {
                    if !v.is_null() {
                        out.push_str(&format!("{key} = {v}\n"));
                    }
                }
            }
            out.push('\n');
        }
    }
    out
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn redact_secret<S: serde::Serializer>(
    value: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

fn redact_url_password<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_database_url(url))
}

/// The database URL with its password replaced, fit for logs and output: the one in the
/// user info and a `password=` query parameter alike.
pub fn redact_database_url(url: &str) -> String {
    const REDACTED: &str = "[redacted]";
    let Ok(mut u) = Url::parse(url) else {
        return "[unparseable]".to_owned();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if let Some(query) = u.query() {
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_password_param(k) => format!("{k}={REDACTED}"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        u.set_query(Some(&query));
    }
    u.to_string()
}

/// A query parameter of a database URL whose value is a secret.
fn is_password_param(name: &str) -> bool {
    let name = url::form_urlencoded::parse(name.as_bytes())
        .next()
        .map_or_else(|| name.to_owned(), |(k, _)| k.into_owned());
    name.eq_ignore_ascii_case("password")
}

/// `log.level` must be a filter whose every part names a level (`info`) or a target and a
/// level (`imprint_sync=debug`). A bare word is a valid directive too, meaning "everything
/// of the target so named": a misspelt `inof` would switch off every log line.
fn check_log_level(level: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for part in level.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let named = part.rsplit_once('=').map_or(part, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(named.trim())) {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "`{}` is not a level ({}) nor target=level",
                    part.chars().take(40).collect::<String>(),
                    LEVELS.join(", ")
                ),
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| ConfigError::new("log.level", format!("not a log filter: {e}")))
}

/// The key of the database URL, as messages name it.
pub(crate) const DB_URL_KEY: &str = "database.url";

/// Parameters of `database.url` that name a file read at connect time: a missing one is a
/// configuration error at start, not a failed connection retried forever.
pub(crate) const DB_URL_FILE_PARAMS: [&str; 7] = [
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
];

/// The other query parameters of `database.url` that sqlx understands. sqlx ignores any
/// other one (and logs it with its value), so a misspelt `sslmode` would silently mean
/// plaintext: refused.
const DB_URL_PARAMS: [&str; 11] = [
    "sslmode",
    "ssl-mode",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Checks `database.url` the way the connection will read it: a URL, a PostgreSQL scheme,
/// only parameters sqlx understands (a bad `sslmode` included). Messages name the parameter,
/// never its value. The certificate files it names are checked when connecting (`db`).
fn check_database_url(url: &str) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| ConfigError::new(DB_URL_KEY, format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(ConfigError::new(
            DB_URL_KEY,
            format!("scheme `{}` is not postgres or postgresql", parsed.scheme()),
        ));
    }
    // libpq's host lists (`h1,h2:5432`) are not something sqlx reads: it looked the whole
    // list up as one name, failing every connection as if DNS were down (retried for ever).
    let host_list = parsed.host_str().is_some_and(|h| h.contains(','))
        || parsed
            .query_pairs()
            .any(|(k, v)| matches!(&*k, "host" | "hostaddr" | "port") && v.contains(','));
    if host_list {
        return Err(ConfigError::new(
            DB_URL_KEY,
            "lists several hosts or ports; name one (a failover address or a pooler in front)",
        ));
    }
    // The raw pairs, not `query_pairs()`: whether a pair has a `=` decides if its name may
    // be shown.
    for raw in parsed
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let raw_name = raw.split_once('=').map_or(raw, |(n, _)| n);
        let name: String = url::form_urlencoded::parse(raw_name.as_bytes())
            .map(|(k, _)| k.into_owned())
            .collect();
        let indexed_option = name.starts_with("options[") && name.ends_with(']');
        if !(DB_URL_PARAMS.contains(&&*name)
            || DB_URL_FILE_PARAMS.contains(&&*name)
            || indexed_option)
        {
            return Err(ConfigError::new(
                DB_URL_KEY,
                format!(
                    "unknown parameter {} (known: {}, {})",
                    shown_param_name(&name, raw.contains('=')),
                    DB_URL_PARAMS.join(", "),
                    DB_URL_FILE_PARAMS.join(", ")
                ),
            ));
        }
    }
    url.parse::<sqlx::postgres::PgConnectOptions>()
        .map(|_| ())
        .map_err(|e| ConfigError::new(DB_URL_KEY, e.to_string()))
}

/// The name of a parameter for an error message, or a note that it is not shown: a name
/// without `=`, or one holding characters no parameter name has, may be a pasted value (a
/// `password%3D…` decodes to `password=…`, a bare `?s3cr3t` is a name without a value).
fn shown_param_name(name: &str, has_value: bool) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.[]".contains(c);
    if has_value && !name.is_empty() && name.len() <= 40 && name.chars().all(plain) {
        format!("`{name}`")
    } else {
        "(name not shown: it may hold a value; parameters are written name=value)".to_owned()
    }
}

/// Variable names are matched without regard to case, so `IMPRINT_SYNC__SYNC__BATCH_SIZE`
/// and `IMPRINT_SYNC__sync__batch_size` set the same key, and which one won changed from run
/// to run (a hash map's order). Two such names are refused; values are never shown.
fn refuse_case_twins<'a>(names: impl Iterator<Item = &'a String>) -> Result<(), ConfigError> {
    let mut seen: std::collections::HashMap<String, &String> = std::collections::HashMap::new();
    for name in names {
        let folded = name.to_ascii_lowercase();
        if let Some(first) = seen.insert(folded.clone(), name) {
            let key = folded
                .trim_start_matches("imprint_sync__")
                .replace("__", ".");
            let (a, b) = if first < name {
                (first, name)
            } else {
                (name, first)
            };
            return Err(ConfigError::new(
                key,
                format!("set twice in the environment, as {a} and {b}: keep one"),
            ));
        }
    }
    Ok(())
}

/// A secret sent in an HTTP header must be visible ASCII: no space, newline or control
/// character. The message never shows the value.
fn header_safe(key: &str, secret: Option<&SecretString>) -> Result<(), ConfigError> {
    match secret {
        Some(s) if !s.expose_secret().bytes().all(|b| b.is_ascii_graphic()) => {
            Err(ConfigError::new(
                key,
                "holds a space, a line break, a control or a non-ASCII character (not allowed in an HTTP header)",
            ))
        }
        _ => Ok(()),
    }
}

/// Largest `api.key_file` read: a key is tens of bytes, and it travels in every request's
/// header.
pub const MAX_KEY_FILE_BYTES: u64 = 4 * 1024;

/// Opens a file named by the configuration that must be a small regular file: a directory,
/// a device such as /dev/zero (read for ever, until out of memory), a FIFO (blocks) or a
/// huge file is refused with a message saying which. Messages never hold the content.
pub fn open_small_file(path: &Path, max_bytes: u64) -> Result<std::fs::File, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.len() > max_bytes {
        return Err(format!("{shown} is larger than {max_bytes} bytes"));
    }
    std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))
}

/// Reads a small text file named by the configuration (see [`open_small_file`]).
fn read_small_file(path: &Path, max_bytes: u64) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let mut bytes = Vec::new();
    open_small_file(path, max_bytes)?
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    // It may have grown between the size check and the read.
    if bytes.len() as u64 > max_bytes {
        return Err(format!("{shown} is larger than {max_bytes} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))
}

/// Turns the config crate's error into one that names the key where it can. An unknown
/// key comes as "unknown field `x` ... for key `section`", which names `section.x`.
fn config_crate_error(e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    let at = text
        .rsplit_once(" for key `")
        .and_then(|(_, rest)| rest.split('`').next());
    let unknown = text
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let key = match (at, unknown) {
        (Some(section), Some(field)) => format!("{section}.{field}"),
        (Some(key), None) | (None, Some(key)) => key.to_owned(),
        (None, None) => "(configuration)".to_owned(),
    };
    ConfigError::new(key, text)
}

//! Exit codes (sysexits where one fits): every command returns one of these.

/// Done, and no row failed.
pub const OK: u8 = 0;
/// `run --once`: at least one row ended failed in this run.
pub const ROWS_FAILED: u8 = 1;
/// `run --once`: the API key was rejected (401/403), or the API redirected (3xx: a wrong
/// `api.base_url`); or a command not built yet.
pub const AUTH_OR_UNAVAILABLE: u8 = 2;
/// Bad configuration or a bad command line (EX_USAGE); the message names the key or flag.
pub const CONFIG: u8 = 64;
/// Alias of [`CONFIG`] for command-line usage errors: the same sysexits code.
pub const USAGE: u8 = CONFIG;
/// Any other error (EX_SOFTWARE); the message says what was being done.
pub const ERROR: u8 = 70;
/// `run --once` was stopped (SIGTERM/SIGINT) before the outbox was drained
/// (EX_TEMPFAIL): run it again.
pub const TEMPFAIL: u8 = 75;
// 130: a second SIGTERM/SIGINT while stopping exits at once (signals::install).

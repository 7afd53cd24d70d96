//! The limits of a profile, in one place (the README lists them): the mapping refuses a row
//! beyond them, and the claim reads no more of a row than they allow.

/// Longest customer id (characters); only `[A-Za-z0-9_-]`.
pub const CUSTOMER_ID_MAX: usize = 64;
/// Longest text field (characters).
pub const TEXT_MAX: usize = 255;
/// Longest email address (characters, RFC 5321).
pub const EMAIL_MAX: usize = 254;
/// Largest `metadata`, serialized (bytes).
pub const METADATA_MAX_BYTES: usize = 16 * 1024;

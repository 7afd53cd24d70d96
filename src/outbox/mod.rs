//! The outbox: its row type and every SQL statement that works it, one file per concern.

pub mod claim;
pub mod dead_letters;
pub mod history;
pub mod model;
pub mod outcome;
pub mod plan;
pub mod reconcile;
pub mod record;
pub mod replay;
pub mod replicas;
pub mod report;
pub mod retention;
pub mod store;

/// The NOTIFY channel the outbox trigger signals.
pub const CHANNEL: &str = "imprint_sync_outbox";
/// The NOTIFY channel on which replicas announce that they joined or left.
pub const WORKERS_CHANNEL: &str = "imprint_sync_workers";

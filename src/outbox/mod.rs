//! The outbox: its row type and every SQL statement that works it.

pub mod claim;
pub mod dead_letters;
pub mod history;
pub mod model;
pub mod outcome;
pub mod plan;
pub mod reconcile;
pub mod store;

//! The admin server: `/livez`, `/readyz`, `/metrics`. (Filled in by the operations work.)

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::Health;
use crate::traffic::Traffic;

/// Starts the admin server; `None` when it is not wanted.
pub async fn spawn(
    _settings: &Settings,
    _health: Arc<Health>,
    _traffic: Arc<Traffic>,
    _shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(None)
}

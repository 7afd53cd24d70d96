//! SIGTERM and SIGINT: the process's stop. One place handles them, for the daemon, the
//! `reconcile` command and the sandbox alike.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The target the stop's log lines have always had: log filters and queries name it.
const TARGET: &str = "imprint_sync::engine::shutdown";

/// The process's stop: cancelled by the first SIGTERM or SIGINT.
static STOP: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();

/// The process's SIGTERM and SIGINT. Once registered, neither kills the process by itself.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Registers the handlers (inside a runtime).
    fn new() -> Self {
        Self {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Waits for the first SIGTERM or SIGINT, for a process that stops at once on either and
/// logs its own words (the sandbox).
pub async fn first() {
    Signals::new().next().await;
}

/// Installs the SIGTERM/SIGINT handling of the process, once (later calls return the same
/// token): the first signal cancels the token, a second exits at once with 130. Call it first
/// thing, inside a runtime: until it runs, a SIGTERM kills the process by the signal (143),
/// which a Job reads as neither done nor "run again". The handlers are registered before this
/// returns, so a signal that comes while the configuration loads is not lost.
pub fn install() -> CancellationToken {
    STOP.get_or_init(|| {
        let token = CancellationToken::new();
        let mut signals = Signals::new();
        let stop = token.clone();
        tokio::spawn(async move {
            let first = signals.next().await;
            tracing::info!(
                target: TARGET,
                signal = first,
                "stopping: no new rows are claimed; in-flight requests may finish"
            );
            stop.cancel();
            let second = signals.next().await;
            tracing::warn!(
                target: TARGET,
                signal = second,
                "second signal: exiting at once (claimed rows are rescued when their lease expires)"
            );
            std::process::exit(130);
        });
        token
    })
    .clone()
}

/// Cancels `token` on the first SIGTERM or SIGINT (at once if one already came); a second
/// signal exits at once.
pub fn on_signals(token: CancellationToken) {
    let process = install();
    if process.is_cancelled() {
        token.cancel();
        return;
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = process.cancelled() => token.cancel(),
            _ = token.cancelled() => {}
        }
    });
}

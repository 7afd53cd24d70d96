//! The commands: configuration, and dispatch into the library.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::{ConfigError, Needs, Settings};
use crate::telemetry::{LogFormat, LogSettings};
use crate::{db, exit, sandbox, telemetry};

/// Runs the command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    let Cli { config, command } = cli;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imprint-sync: starting the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    if matches!(command, Command::Run(_) | Command::Reconcile(_)) {
        // First thing: a SIGTERM while the configuration loads stops the run like one at any
        // later moment (exit 75 from `run --once`), instead of killing the process.
        let _entered = runtime.enter();
        crate::signals::install();
    }
    if let Command::Run(args) = &command
        && args.stray_filter()
    {
        eprintln!(
            "imprint-sync: --code, --customer, --since and --ids choose rows to replay: \
             use them with --replay-failed"
        );
        return ExitCode::from(exit::USAGE);
    }
    match &command {
        // Neither needs a configuration: they describe the command line itself.
        Command::Completions { shell } => {
            crate::cli::completions(*shell, &mut std::io::stdout());
            return ExitCode::from(exit::OK);
        }
        Command::Man => {
            return match crate::cli::man(&mut std::io::stdout()) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("imprint-sync: writing the man page: {e}");
                    ExitCode::from(exit::ERROR)
                }
            };
        }
        _ => {}
    }
    if let Command::Sandbox(args) = command {
        // The sandbox needs no configuration of ours: it must start even with a broken one.
        // Held to the end so its spans (with an endpoint set) are flushed; an endpoint it
        // cannot use does not stop the sandbox.
        let _traces = telemetry::init(&LogSettings {
            format: LogFormat::Pretty,
            level: "info".into(),
        });
        return block_on(runtime, async move {
            sandbox::serve(args.into()).await.map(|()| exit::OK)
        });
    }
    let needs = match &command {
        Command::Run(args) if !args.dry_run => Needs::ApiKey,
        Command::Reconcile(_) => Needs::ApiKey,
        _ => Needs::Nothing,
    };
    let settings = match load_settings(config.as_deref(), needs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("imprint-sync: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let mut log = settings.log.clone();
    if matches!(command, Command::Demo(_)) {
        // The demo talks to a person: readable, and quiet unless something is wrong. Per-row
        // warnings (its invalid rows, on purpose) are counted in its summary instead.
        log = LogSettings {
            format: LogFormat::Pretty,
            level: "warn,imprint_sync::engine=error".into(),
        };
    }
    // Held until the command is done: dropping it sends the spans still buffered.
    let _traces = match telemetry::init(&log) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("imprint-sync: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    block_on(runtime, dispatch(command, settings))
}

/// Runs a command on the runtime and turns its result into the exit code.
fn block_on(
    runtime: tokio::runtime::Runtime,
    command: impl Future<Output = anyhow::Result<u8>>,
) -> ExitCode {
    match runtime.block_on(command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(config) = config_error(&e) {
                eprintln!("imprint-sync: {config}");
                return ExitCode::from(exit::CONFIG);
            }
            // Once, as plain text: the last word of a process is read by a person (a JSON log
            // collector keeps the line as it is).
            eprintln!("imprint-sync: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

/// A configuration error met while running (a key the API client refuses, a certificate
/// that does not verify): exits 64 like one found at load.
fn config_error(e: &anyhow::Error) -> Option<ConfigError> {
    e.chain()
        .find_map(|c| c.downcast_ref::<ConfigError>())
        .map(|c| ConfigError::new(c.key.clone(), c.message.clone()))
        .or_else(|| db::config_error(e))
}

fn load_settings(config: Option<&Path>, needs: Needs) -> Result<Settings, ConfigError> {
    let settings = Settings::load(config)?;
    settings.require(needs)?;
    Ok(settings)
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<u8> {
    match command {
        Command::CheckConfig => {
            print!("{}", settings.redacted_toml());
            println!("# configuration is valid");
            Ok(exit::OK)
        }
        Command::Migrate => {
            db::migrate_waiting(&settings.database).await?;
            println!("migrations applied");
            Ok(exit::OK)
        }
        Command::Run(args) => crate::run::run(settings, args).await,
        Command::Sandbox(_) => unreachable!("the sandbox runs before the configuration is loaded"),
        Command::Status(args) => crate::status::status(&settings, &args).await,
        Command::Failed(args) => crate::inspect::failed(&settings, &args)
            .await
            .map(|()| exit::OK),
        Command::History {
            customer_id,
            limit,
            json,
        } => crate::inspect::history(&settings, &customer_id, limit, json)
            .await
            .map(|()| exit::OK),
        Command::Demo(args) => crate::demo::demo(&settings, args).await,
        Command::Completions { .. } | Command::Man => {
            unreachable!("answered before the configuration is loaded")
        }
        Command::Reconcile(args) => crate::reconcile::command::reconcile(settings, args).await,
    }
}

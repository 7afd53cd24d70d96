use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = imprint_sync::cli::Cli::parse();
    imprint_sync::app::main(cli)
}

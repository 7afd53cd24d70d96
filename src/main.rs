use std::process::ExitCode;

fn main() -> ExitCode {
    match imprint_sync::cli::parse() {
        Ok(cli) => imprint_sync::app::main(cli),
        Err(code) => code,
    }
}

use std::process::ExitCode;

use clap::Parser;

// Many small allocations per row (JSON, HTTP headers): mimalloc halves their cost against
// glibc's malloc under the multi-threaded runtime (see bench/results.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = imprint_sync::cli::Cli::parse();
    imprint_sync::app::main(cli)
}

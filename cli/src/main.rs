//! The `ringtrain` binary. Each role is a subcommand; this file only parses
//! arguments and dispatches.

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringtrain_common::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "ringtrain",
    version,
    about = "Distributed data-parallel training with ring all-reduce"
)]
struct Cli {
    /// Log line format on stderr: text or json.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "RINGTRAIN_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks of the data plane and of training.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "warn,ringtrain=info");
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the cause, then the chain for context.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

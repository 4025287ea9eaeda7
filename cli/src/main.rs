//! The `ringtrain` binary. Each role is a subcommand; this file only parses
//! arguments and dispatches.

mod bench;
mod commands;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use commands::{certs, client, generate, health, local, plot, serve};
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
    /// Run the coordinator service.
    Coordinator(serve::CoordinatorArgs),
    /// Run a worker that joins a coordinator.
    Worker(serve::WorkerArgs),
    /// Submit a job spec to a coordinator.
    Submit(client::SubmitArgs),
    /// Show jobs and workers, or one job.
    Status(client::StatusArgs),
    /// Follow a job's progress to its end.
    Watch(client::WatchArgs),
    /// Cancel a job.
    Cancel(client::CancelArgs),
    /// Plot a job's train loss and test accuracy against step (PNG, optional CSV).
    Plot(plot::PlotArgs),
    /// Sample text from a checkpoint of the built-in transformer (model = "gpt").
    Generate(generate::GenerateArgs),
    /// Check a coordinator's or worker's grpc.health.v1 status (exit 0 = SERVING).
    Health(health::HealthArgs),
    /// Run a job on a coordinator and N workers started here on loopback.
    Local(local::LocalArgs),
    /// Make the certificates and tokens of a cluster (mutual TLS).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Benchmarks of the data plane and of training.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The serving roles start tracing once their config is read (it may
    // name an OpenTelemetry collector).
    let serving = matches!(cli.command, Command::Coordinator(_) | Command::Worker(_));
    let quiet = matches!(
        cli.command,
        Command::Bench(_) | Command::Local(_) | Command::Health(_) | Command::Generate(_)
    );
    if !serving {
        telemetry::init(cli.log_format, if quiet { "warn" } else { "info" });
    }
    telemetry::log_panics();
    let result = match cli.command {
        Command::Coordinator(a) => serve::coordinator(a, cli.log_format),
        Command::Worker(a) => serve::worker(a, cli.log_format),
        Command::Submit(a) => runtime().and_then(|rt| rt.block_on(client::submit(a))),
        Command::Status(a) => runtime().and_then(|rt| rt.block_on(client::status(a))),
        Command::Watch(a) => runtime().and_then(|rt| rt.block_on(client::watch(a))),
        Command::Cancel(a) => runtime().and_then(|rt| rt.block_on(client::cancel(a))),
        Command::Plot(a) => runtime().and_then(|rt| rt.block_on(plot::run(a))),
        Command::Health(a) => runtime().and_then(|rt| rt.block_on(health::run(a))),
        Command::Generate(a) => generate::run(a),
        Command::Local(a) => runtime().and_then(|rt| rt.block_on(local::run(a))),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the cause.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

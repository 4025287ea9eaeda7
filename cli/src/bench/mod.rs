//! `ringtrain bench ...`: programs that print figures as JSON lines, in the
//! same shape as the reference benchmarks in `shared/bench/peers/`.

mod allreduce;
mod faults;
mod recovery;
mod train;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ring all-reduce of one f32 buffer across W rank processes on loopback.
    Allreduce(allreduce::Args),
    /// One rank of `bench allreduce` (started by it; not for direct use).
    #[command(hide = true)]
    AllreduceRank(allreduce::RankArgs),
    /// Data-parallel training throughput, as shared/bench/peers/ddp_train.py measures it.
    Train(train::TrainArgs),
    /// Time from a worker's death, and from a new worker's start, to the next completed step.
    Recovery(recovery::RecoveryArgs),
    /// Test accuracy with a worker killed at given steps, against fault-free runs, per seed.
    Faults(faults::FaultsArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Allreduce(args) => allreduce::run(args),
        BenchCommand::AllreduceRank(args) => allreduce::run_rank(args),
        BenchCommand::Train(args) => runtime()?.block_on(train::run(args)),
        BenchCommand::Recovery(args) => runtime()?.block_on(recovery::run(args)),
        BenchCommand::Faults(args) => runtime()?.block_on(faults::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

//! `ringtrain generate CKPT --prompt TEXT --tokens N`: text sampled from a
//! checkpoint of the built-in transformer (`model = "gpt"`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A checkpoint directory of a gpt job.
    pub checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature (0 = always the likeliest byte).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tokens <= 1_000_000,
        "--tokens {} is more than a million",
        args.tokens
    );
    let out = ringtrain_worker::generate::from_checkpoint(
        &args.checkpoint,
        args.prompt.as_bytes(),
        args.tokens,
        args.temperature,
        args.seed,
    )?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(args.prompt.as_bytes())
        .and_then(|()| stdout.write_all(&out))
        .and_then(|()| stdout.write_all(b"\n"))
        .context("writing to stdout")
}

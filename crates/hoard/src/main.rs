//! The `hoard` binary: parse the configuration, wire the crates together,
//! run until a signal, shut down in order. Policy lives in the libraries.

mod config;
mod drift;
mod serve;
mod settings;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match config::from_args_and_env(&args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hoard: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match cmd {
        config::Command::Help => {
            print!("{}", settings::help());
            return ExitCode::SUCCESS;
        }
        config::Command::Version => {
            println!("hoard {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        config::Command::Serve(cfg) => cfg,
        config::Command::Drift(cfg) => return drift::main(&cfg),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hoard-worker")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve::run(*cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

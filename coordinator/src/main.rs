//! `meshd-coordinator`: parses the command line, sets up logging, and hands over to the library.

use std::net::TcpListener;

use anyhow::Context;
use clap::Parser;
use meshd_coordinator::config::{self, Cli, Command};
use meshd_coordinator::{cli, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match args.command {
        Command::Serve(serve) => {
            let file = config::load_file(&args.common)?;
            let config = config::serve(&args.common, &serve, &file)?;
            let listener = TcpListener::bind(config.listen).with_context(|| {
                format!(
                    "listening on {} (is another coordinator running? choose another with --listen)",
                    config.listen
                )
            })?;
            run(config, listener, shutdown_signal()).await
        }
        Command::Apikey(command) => cli::apikey(&cli::storage_for(&args.common)?, command).await,
        Command::Token(command) => cli::token(&cli::storage_for(&args.common)?, command).await,
        Command::Node(command) => cli::node(&cli::storage_for(&args.common)?, command).await,
    }
}

/// Ctrl-C or SIGTERM (docker stop, systemd).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

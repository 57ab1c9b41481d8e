//! `meshd-coordinator`: parses the command line, sets up logging, and hands over to the library.

use std::io::IsTerminal;
use std::net::TcpListener;

use anyhow::Context;
use clap::Parser;
use meshd_coordinator::config::{self, Cli, Command, LogFormat};
use meshd_coordinator::{cli, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    let log_format = match &args.command {
        // A config file that does not load is reported when `serve` loads it again below; until then, text.
        Command::Serve(serve) => config::log_format(serve, &config::load_file(&args.common).unwrap_or_default()),
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match args.command {
        Command::Serve(serve) => {
            raise_open_files_limit();
            keep_large_buffers_out_of_the_heap();
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
        Command::Device(command) => cli::device(&cli::storage_for(&args.common)?, command).await,
    }
}

/// Logs to stderr, filtered by `RUST_LOG`. Colours only when stderr is a terminal: escape codes in a log file or a
/// journal are noise that breaks grep.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Every node holds a map stream (one socket) open: raise the soft limit of open files to the hard limit (often 1024
/// soft against 500,000 hard), so the number of nodes is not capped by a default meant for interactive shells.
#[allow(unsafe_code)]
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed, which lives on this stack frame.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
        }
    };
    if raised {
        tracing::debug!(
            open_files = limit.rlim_max,
            "raised the open-files limit to the hard limit"
        );
    } else {
        tracing::warn!(
            soft = limit.rlim_cur,
            "could not raise the open-files limit; each node's map stream needs one"
        );
    }
}

/// Full maps are buffers of megabytes (10,000 nodes: ~2.5 MB) that live for one write. glibc raises its mmap threshold
/// each time such a buffer is freed (up to 32 MiB), so the next ones come from the heap, and what they leave there
/// stays resident. A fixed threshold keeps every buffer above it in its own mapping, returned when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_large_buffers_out_of_the_heap() {
    // SAFETY: mallopt only sets a parameter of glibc's allocator (under the allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_buffers_out_of_the_heap() {}

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

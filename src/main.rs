//! The `autosync` command: parses arguments, sets up logging and hands over to the library.

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = autosync::cli::Cli::parse();
    if !matches!(cli.command, autosync::cli::Command::Mount { .. }) {
        // A command whose output goes to `head` ends quietly when the pipe closes, like
        // other command-line tools. The daemon keeps ignoring SIGPIPE (sockets, pipes).
        // SAFETY: restoring a default signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = autosync::cli::run(cli) {
        eprintln!("autosync: {e:#}");
        std::process::exit(1);
    }
}

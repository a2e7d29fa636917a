//! # splitvisor-bench: the benchmark suite in one command
//!
//! ```sh
//! cargo run --release -p splitvisor-bench -- all [--quick] [--out DIR]
//! cargo run --release -p splitvisor-bench -- plot DIR    # redraw the PNGs from DIR's JSON
//! cargo run --release -p splitvisor-bench -- check DIR   # every PNG there is a valid image
//! ```
//!
//! `all` runs the workspace's benchmarks as child `cargo bench` processes, each
//! writing its JSON into the results directory (`SPLITVISOR_BENCH_OUT`), then a
//! run of its own with a memory node attached and detached mid-run (sampled
//! from the VMM's control API), and draws the figures as PNG files beside the
//! JSON. See docs/benchmarks.md.

mod check;
mod data;
mod plot;
mod progress;
mod run;
mod suite;
mod timeline;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "splitvisor-bench",
    about = "Splitvisor's benchmark suite: runs the benches, writes their JSON and PNG plots into one directory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run every suite, then draw the plots and check them.
    All(suite::SuiteArgs),
    /// Draw the plots again from the JSON in a results directory.
    Plot {
        /// The results directory.
        dir: PathBuf,
    },
    /// Check that every plot in a results directory was written and decodes
    /// as a PNG, and that every JSON file there parses.
    Check {
        /// The results directory.
        dir: PathBuf,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// A suite step failed.
    #[error(transparent)]
    Suite(#[from] suite::SuiteError),
    /// Drawing failed.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// The results did not pass the check.
    #[error(transparent)]
    Check(#[from] check::CheckError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: Result<(), Error> = match cli.cmd {
        Cmd::All(a) => suite::run_all(&a).map_err(Error::from),
        Cmd::Plot { dir } => plot::plot_dir(&dir)
            .map_err(Error::from)
            .and_then(|written| {
                for p in written {
                    println!("wrote {}", p.display());
                }
                check::check_dir(&dir).map_err(Error::from)
            }),
        Cmd::Check { dir } => check::check_dir(&dir).map_err(Error::from),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            eprintln!("splitvisor-bench: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

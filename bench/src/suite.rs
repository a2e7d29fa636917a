//! `splitvisor-bench all`: the steps of the suite, run in order with a
//! progress line each; a failed step is reported and the others still run.

use crate::progress::{Progress, human};
use crate::run::{self, RunError};
use crate::timeline::{self, TimelineError};
use crate::{check, plot};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Options of `splitvisor-bench all`.
#[derive(clap::Args, Debug)]
pub struct SuiteArgs {
    /// Short runs (a few minutes in all; the figures are rough).
    #[arg(long)]
    pub quick: bool,
    /// The results directory (default: target/bench/suite in the workspace).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run only these steps (comma-separated: build, fabric, memory, applications, security, replication,
    /// storage, timeline, plots), e.g. to redo one into an existing directory.
    #[arg(long, value_name = "STEPS", value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Why the suite failed.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// The results directory could not be made.
    #[error("cannot create the results directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--only` names no step.
    #[error(
        "no step is named {0:?} (steps: build, fabric, memory, security, replication, storage, timeline, plots)"
    )]
    NoSuchStep(String),
    /// The binaries' directory is unknown.
    #[error("cannot find this program's own path")]
    CurrentExe(#[source] std::io::Error),
    /// Some steps failed (each with its error; the others ran).
    #[error("{} step(s) failed:{}", .0.len(), list(.0))]
    Steps(Vec<(&'static str, StepError)>),
}

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A child process failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The attach/detach run failed.
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// Drawing failed.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// The results did not pass the check.
    #[error(transparent)]
    Check(#[from] check::CheckError),
}

fn list(errors: &[(&'static str, StepError)]) -> String {
    let mut s = String::new();
    for (step, e) in errors {
        s.push_str(&format!("\n  {step}: {e}"));
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            s.push_str(&format!(": {c}"));
            cause = c.source();
        }
    }
    s
}

/// What a step does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `cargo build --release` of the binaries the timeline runs.
    Build,
    /// `cargo bench -p PACKAGE --bench BENCH`, its JSON to `OUT` in the results.
    Bench {
        package: &'static str,
        bench: &'static str,
        out: &'static str,
    },
    /// The attach/detach run.
    Timeline,
    /// Draw the PNGs, then check them.
    Plot,
}

/// One step: its name, kind, and estimated duration (quick, full) on a
/// 2-CPU machine with everything already built.
#[derive(Debug, Clone, Copy)]
struct Step {
    name: &'static str,
    kind: Kind,
    estimate_s: (u64, u64),
}

const STEPS: [Step; 9] = [
    Step {
        name: "build",
        kind: Kind::Build,
        estimate_s: (15, 15),
    },
    Step {
        name: "fabric",
        kind: Kind::Bench {
            package: "memnode",
            bench: "fabric_rtt",
            out: crate::data::FABRIC_JSON,
        },
        estimate_s: (30, 30),
    },
    Step {
        name: "memory",
        kind: Kind::Bench {
            package: "vmm",
            bench: "remote_memory",
            out: crate::data::MEMORY_JSON,
        },
        estimate_s: (15, 540),
    },
    Step {
        name: "applications",
        kind: Kind::Bench {
            package: "vmm",
            bench: "app_workloads",
            out: "app_workloads.json",
        },
        estimate_s: (10, 600),
    },
    Step {
        name: "security",
        kind: Kind::Bench {
            package: "vmm",
            bench: "page_security",
            out: "page_security.json",
        },
        estimate_s: (10, 200),
    },
    Step {
        name: "replication",
        kind: Kind::Bench {
            package: "vmm",
            bench: "replication",
            out: "replication.json",
        },
        estimate_s: (40, 420),
    },
    Step {
        name: "storage",
        kind: Kind::Bench {
            package: "storagenode",
            bench: "nbd",
            out: crate::data::STORAGE_JSON,
        },
        estimate_s: (25, 100),
    },
    Step {
        name: "timeline",
        kind: Kind::Timeline,
        estimate_s: (10, 30),
    },
    Step {
        name: "plots",
        kind: Kind::Plot,
        estimate_s: (2, 2),
    },
];

/// The workspace's root (this crate's parent directory).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo`, as the one that started this program names it.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace());
    c
}

/// Runs every step; fails after the last one if any failed.
pub fn run_all(a: &SuiteArgs) -> Result<(), SuiteError> {
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| workspace().join("target/bench/suite"));
    std::fs::create_dir_all(&dir).map_err(|source| SuiteError::Dir {
        path: dir.clone(),
        source,
    })?;
    // Absolute, since the benches run in their own directories.
    let dir = std::fs::canonicalize(&dir).map_err(|source| SuiteError::Dir {
        path: dir.clone(),
        source,
    })?;
    let bin_dir = std::env::current_exe()
        .map_err(SuiteError::CurrentExe)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if let Some(bad) = a
        .only
        .iter()
        .find(|o| !STEPS.iter().any(|s| s.name == o.as_str()))
    {
        return Err(SuiteError::NoSuchStep(bad.clone()));
    }
    let steps: Vec<&Step> = STEPS
        .iter()
        .filter(|s| a.only.is_empty() || a.only.iter().any(|o| o == s.name))
        .collect();
    let est = |s: &&Step| {
        Duration::from_secs(if a.quick {
            s.estimate_s.0
        } else {
            s.estimate_s.1
        })
    };
    let mut progress = Progress::new(steps.iter().map(est).collect());
    println!(
        "splitvisor-bench: {} run, results in {}",
        if a.quick { "quick" } else { "full" },
        dir.display()
    );
    let started = Instant::now();
    let mut failed = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        println!(
            "{}",
            progress.start_line(i, step.name, &what(step, a.quick))
        );
        let t = Instant::now();
        let r = run_step(step, &dir, &bin_dir, a.quick);
        let took = t.elapsed();
        progress.step_done(took);
        match r {
            Ok(()) => println!("      done in {}", human(took)),
            Err(e) => {
                println!("      FAILED after {}: {e}", human(took));
                failed.push((step.name, e));
            }
        }
    }
    println!(
        "splitvisor-bench: {} steps in {}, {} failed; results in {}",
        steps.len(),
        human(started.elapsed()),
        failed.len(),
        dir.display()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(SuiteError::Steps(failed))
    }
}

/// What a step runs, for its progress line.
fn what(step: &Step, quick: bool) -> String {
    let q = if quick {
        "SPLITVISOR_BENCH_QUICK=1 "
    } else {
        ""
    };
    match step.kind {
        Kind::Build => "cargo build --release -p vmm -p memnode".into(),
        Kind::Bench { package, bench, .. } => {
            format!("{q}cargo bench -p {package} --bench {bench}")
        }
        Kind::Timeline => "a VM with a memory node attached and another detached mid-run".into(),
        Kind::Plot => "PNG plots, then their check".into(),
    }
}

fn run_step(step: &Step, dir: &Path, bin_dir: &Path, quick: bool) -> Result<(), StepError> {
    let logs = dir.join("logs");
    match step.kind {
        Kind::Build => {
            let mut c = cargo();
            c.args(["build", "--release", "-p", "vmm", "-p", "memnode"]);
            run::run_logged(&mut c, &logs.join("build.log"))?;
        }
        Kind::Bench {
            package,
            bench,
            out,
        } => {
            let mut c = cargo();
            c.args(["bench", "-p", package, "--bench", bench])
                .env("SPLITVISOR_BENCH_OUT", dir.join(out));
            if quick {
                c.env("SPLITVISOR_BENCH_QUICK", "1");
            } else {
                c.env_remove("SPLITVISOR_BENCH_QUICK");
            }
            run::run_logged(&mut c, &logs.join(format!("{bench}.log")))?;
        }
        Kind::Timeline => {
            timeline::run(dir, bin_dir, timeline::Shape::new(quick))?;
        }
        Kind::Plot => {
            for p in plot::plot_dir(dir)? {
                println!("      wrote {}", p.display());
            }
            check::check_dir(dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plot_input_is_written_by_a_step() {
        let outs: Vec<&str> = STEPS
            .iter()
            .filter_map(|s| match s.kind {
                Kind::Bench { out, .. } => Some(out),
                Kind::Timeline => Some(crate::data::TIMELINE_JSON),
                _ => None,
            })
            .collect();
        for (png, inputs) in plot::PLOTS {
            for i in inputs {
                assert!(outs.contains(i), "{png} needs {i}, which no step writes");
            }
        }
        assert!(what(&STEPS[1], true).starts_with("SPLITVISOR_BENCH_QUICK=1 cargo bench"));
    }
}

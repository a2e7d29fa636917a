//! Child processes whose output goes to a log file in the results directory;
//! the caller waits for each one it starts.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Why a child process failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The log file could not be created.
    #[error("cannot create the log file {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the process failed.
    #[error("waiting for `{cmd}` failed")]
    Wait {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process exited unsuccessfully.
    #[error("`{cmd}` failed ({status}); its output is in {log}{tail}")]
    Failed {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
        /// Its log.
        log: PathBuf,
        /// The log's last lines, each on a line of its own (may be empty).
        tail: String,
    },
}

/// `cmd` as one line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to its end with stdout and stderr appended to `log` (created or
/// truncated); fails if it does not exit with success.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), RunError> {
    let file = log_file(log)?;
    let err = file.try_clone().map_err(|source| RunError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|source| RunError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    let status = child.wait().map_err(|source| RunError::Wait {
        cmd: line.clone(),
        source,
    })?;
    check_status(line, status, log)
}

/// Creates (or truncates) a log file, and its directory.
pub fn log_file(log: &Path) -> Result<File, RunError> {
    let mk = |source| RunError::Log {
        path: log.to_path_buf(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(mk)?;
    }
    File::create(log).map_err(mk)
}

/// Ok on success; else a [`RunError::Failed`] quoting the log's last lines.
pub fn check_status(cmd: String, status: ExitStatus, log: &Path) -> Result<(), RunError> {
    if status.success() {
        return Ok(());
    }
    Err(RunError::Failed {
        cmd,
        status,
        log: log.to_path_buf(),
        tail: tail(log, 12),
    })
}

/// The last `n` lines of the file at `path`, each preceded by a newline and an
/// indent; empty if it cannot be read.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("\n    {l}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_names_its_log_and_quotes_its_end() {
        let dir = std::env::temp_dir().join(format!("sv-bench-run-{}", std::process::id()));
        let log = dir.join("logs/fail.log");
        let e = run_logged(
            Command::new("sh").args(["-c", "echo first; echo last >&2; exit 3"]),
            &log,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("fail.log"), "{msg}");
        assert!(msg.contains("\n    first\n    last"), "{msg}");
        run_logged(Command::new("true").arg("x"), &log).unwrap();
        let missing = run_logged(&mut Command::new("/nonexistent/tool"), &log).unwrap_err();
        assert!(matches!(missing, RunError::Spawn { .. }), "{missing}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

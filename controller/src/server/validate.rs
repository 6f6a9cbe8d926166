//! Uploaded models are first built and test-run in a child process (`edgefleet-controller
//! validate-model`, hidden), under an address-space limit and a time limit. An uploaded ONNX file
//! is untrusted input, and the controller is built with `panic = "abort"`: a model that makes the
//! inference library panic, allocate without bound or spin must cost a refused upload, not the
//! controller. Only a model the child built cleanly is built again in the controller (the build is
//! deterministic), so the registry's answers come from the same code either way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use edgefleet_protocol::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::release::{self, ReleaseSpec};

/// The child's address-space limit unless `--validation-memory-mib` says otherwise.
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
/// How long one validation may run.
pub const TIME_LIMIT: Duration = Duration::from_secs(300);

/// What the parent sends the child on standard input (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    model: PathBuf,
    spec: ReleaseSpec,
    now: Timestamp,
    memory_mib: u64,
}

/// What the child answers on standard output (JSON).
#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Valid,
    /// The model or its spec is wrong: the registry's 422 with this code.
    Refused {
        code: String,
        message: String,
    },
    /// Something else went wrong (I/O on the controller's side).
    Failed {
        message: String,
    },
}

/// Why a model did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("{message}")]
    Refused { code: String, message: String },
    #[error(
        "validating the model {0}; the model cannot be run safely (check it loads and runs with tract-onnx 0.23 and stays within the validator's memory limit)"
    )]
    Crashed(String),
    #[error("validating the model took longer than {0:?}; the model is refused")]
    TimedOut(Duration),
    #[error("the model validator could not run: {0}")]
    Internal(String),
}

/// Parent side: validates `model` with `spec` in a child process of `exe`.
pub async fn check(
    exe: &Path,
    model: &Path,
    spec: &ReleaseSpec,
    now: Timestamp,
    memory_mib: u64,
) -> Result<(), ValidationError> {
    let job = serde_json::to_vec(&Job {
        model: model.to_path_buf(),
        spec: spec.clone(),
        now,
        memory_mib,
    })
    .map_err(|e| ValidationError::Internal(e.to_string()))?;
    let mut child = tokio::process::Command::new(exe)
        .arg("validate-model")
        .env("EDGEFLEET_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ValidationError::Internal(format!("cannot start {}: {e}", exe.display())))?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ValidationError::Internal(
            "no pipes to the validator".into(),
        ));
    };
    let run = async {
        // The child may die before reading everything; its exit status says why.
        let _ = stdin.write_all(&job).await;
        drop(stdin);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (_, _, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        (out, err, status)
    };
    let (out, err, status) = tokio::time::timeout(TIME_LIMIT, run)
        .await
        .map_err(|_| ValidationError::TimedOut(TIME_LIMIT))?;
    let status = status.map_err(|e| ValidationError::Internal(e.to_string()))?;
    match serde_json::from_slice::<Outcome>(&out) {
        Ok(Outcome::Valid) if status.success() => Ok(()),
        Ok(Outcome::Refused { code, message }) => Err(ValidationError::Refused { code, message }),
        Ok(Outcome::Failed { message }) => Err(ValidationError::Internal(message)),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            let how = match status.signal() {
                Some(signal) => format!("killed the validator (signal {signal})"),
                None => format!("made the validator fail ({status})"),
            };
            let last = String::from_utf8_lossy(&err);
            let last = last.lines().rev().find(|l| !l.trim().is_empty());
            tracing::warn!(%how, last_words = last.unwrap_or(""), "model validation crashed");
            Err(ValidationError::Crashed(how))
        }
    }
}

/// Child side: reads a job on standard input, limits its own address space, builds the release
/// and answers on standard output.
pub fn child_main() -> ExitCode {
    let mut input = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("error: cannot read the validation job: {err}");
        return ExitCode::FAILURE;
    }
    let job: Job = match serde_json::from_slice(&input) {
        Ok(job) => job,
        Err(err) => {
            eprintln!(
                "error: `validate-model` is run by the controller itself, with a job on standard input: {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    let limit = job.memory_mib.saturating_mul(1024 * 1024);
    if let Err(err) = rlimit::setrlimit(rlimit::Resource::AS, limit, limit) {
        eprintln!("error: cannot limit the validator's memory: {err}");
        return ExitCode::FAILURE;
    }
    let outcome = match release::build_release(&job.model, &job.spec, job.now) {
        Ok(_) => Outcome::Valid,
        Err(err) if err.is_input_error() => Outcome::Refused {
            code: err.code().to_owned(),
            message: err.to_string(),
        },
        Err(err) => Outcome::Failed {
            message: err.to_string(),
        },
    };
    let answer = serde_json::to_vec(&outcome).unwrap_or_default();
    let mut stdout = std::io::stdout();
    if stdout
        .write_all(&answer)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

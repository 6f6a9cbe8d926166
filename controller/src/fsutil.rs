//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.
//! A reader sees the old file or the new one, never half of either.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Permission bits for secrets (owner read/write only).
pub const SECRET_MODE: u32 = 0o600;
/// Permission bits for public documents.
pub const PUBLIC_MODE: u32 = 0o644;

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Atomically replaces (or creates) `path` with `bytes`, with permission `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_with(path, mode, |file| file.write_all(bytes).map_err(Into::into))
}

/// Atomically replaces (or creates) `path` with what `fill` writes into the temp file; returns
/// what `fill` returns.
pub fn write_atomic_with<T>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<T>,
) -> Result<T> {
    let tmp = temp_path(path);
    let res = (|| -> Result<T> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let filled = fill(&mut file)?;
        file.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} into place", path.display()))?;
        File::open(parent_dir(path))
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot fsync directory of {}", path.display()))?;
        Ok(filled)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Creates `path` with `bytes` and permission `mode`, refusing to overwrite an existing file.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if path.exists() {
        anyhow::bail!(
            "{} already exists; refusing to overwrite it (move it away first)",
            path.display()
        );
    }
    // Written atomically so a crash never leaves a truncated key behind.
    write_atomic(path, bytes, mode)
}

/// Reads a whole file, saying which file failed.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Creates `dir` (and parents) readable only by its owner.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

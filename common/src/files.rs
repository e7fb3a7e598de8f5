//! Files a program watches for changes (TLS certificates, a topology), and
//! files written for others to watch.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: to a new file beside it, then
/// renamed over it, so a reader sees the old file or the new one, never a
/// part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".{}.new", std::process::id()));
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}

/// The modification stamp of a file, to see that it changed (a rename
/// into place changes its inode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<(std::time::SystemTime, u64, u64)>);

impl Stamp {
    /// The stamp of `path` now (none when it cannot be read).
    pub fn of(path: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        // Through symbolic links: a mounted Kubernetes Secret or ConfigMap
        // changes by swapping a link to a new directory.
        Stamp(std::fs::metadata(path).ok().map(|m| {
            (
                m.modified().unwrap_or(std::time::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        }))
    }
}

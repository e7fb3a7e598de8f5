//! Files a program watches for changes (TLS certificates, a topology).

use std::path::Path;

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

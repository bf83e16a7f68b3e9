//! File modes of the state: the database holds the refresh token, so the state directory is
//! 0700 and every file in it 0600, whatever the umask (the CLI also sets umask 077 at start).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and missing parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `file` empty with mode 0600 if it does not exist yet (an existing file is untouched).
pub fn create_private_file(file: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `text` to a new file readable by its owner only.
pub fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(text.as_bytes())
}

/// Writes `text` to a new private file `<stem>.json` in `dir`, or `<stem>-2.json`, `-3`, … when
/// that name is taken (two reports in the same second never overwrite each other). Returns it.
pub fn write_new_private(dir: &Path, stem: &str, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    for n in 1..1000 {
        let name = if n == 1 {
            format!("{stem}.json")
        } else {
            format!("{stem}-{n}.json")
        };
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(text.as_bytes())?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("too many reports named {stem} in {}", dir.display()),
    ))
}

/// The state's files and directories that group or others can read or write, with their modes:
/// the database, its WAL and shared-memory files, the lock, the reports, and their directories.
pub fn too_open(db: &Path) -> Vec<(PathBuf, u32)> {
    let mut candidates = vec![];
    if let Some(dir) = db.parent() {
        candidates.push(dir.to_path_buf());
        let reports = dir.join("reports");
        if let Ok(rd) = std::fs::read_dir(&reports) {
            candidates.push(reports.clone());
            candidates.extend(rd.flatten().map(|e| e.path()));
        }
    }
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        candidates.push(PathBuf::from(p));
    }
    candidates
        .into_iter()
        .filter_map(|p| {
            let mode = std::fs::metadata(&p).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then_some((p, mode))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_in_the_same_second_get_their_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_new_private(dir.path(), "r", "one").unwrap();
        let b = write_new_private(dir.path(), "r", "two").unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::read_to_string(a).unwrap(), "one");
        assert_eq!(std::fs::read_to_string(b).unwrap(), "two");
    }
}

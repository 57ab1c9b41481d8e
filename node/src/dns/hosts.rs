//! The managed block in a hosts file (`/etc/hosts`): names for hosts without systemd-resolved, in containers and in
//! network namespaces.
//!
//! The block sits between two marker lines naming the interface, so several agents (one per interface) and other
//! tools' blocks live side by side. [`splice`] is pure and keeps every byte outside the block. [`HostsFile::write`]
//! is the IO shell: it takes a lock shared by every meshd writer on the machine (`flock` on
//! `/run/lock/meshd-hosts.lock`), writes only when the content changes, and replaces the file atomically (temporary file in the same
//! directory, fsync, rename). A file that cannot be renamed over (a bind mount, as Docker and `ip netns exec` make
//! it: EBUSY) or whose directory is read-only is rewritten in place instead. Removed on `meshd down` and `leave`;
//! a block left by a crash is replaced on the next start.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use meshd_protocol::dns::NameTable;

/// Why the hosts file could not be updated; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "{path} has the line `{begin}` but no matching `{end}` after it; remove the meshd lines by hand (or restore the file) and meshd rewrites the block"
    )]
    Unbalanced { path: String, begin: String, end: String },
}

/// The marker lines of the block for `interface` (without line ends).
pub fn markers(interface: &str) -> (String, String) {
    (
        format!("# BEGIN meshd {interface}: mesh names, managed by meshd (do not edit)"),
        format!("# END meshd {interface}"),
    )
}

/// The block for `table` (marker lines included, each line ending in `\n`): one line per node, the fully qualified
/// name first (what reverse lookups show), then the bare name. Names were validated when the table was built.
pub fn render_block(interface: &str, table: &NameTable) -> String {
    let (begin, end) = markers(interface);
    let mut block = String::with_capacity(64 + table.len() * 64);
    block.push_str(&begin);
    block.push('\n');
    for (name, ip) in table.entries() {
        block.push_str(&format!("{ip}\t{} {name}\n", table.fqdn(name)));
    }
    block.push_str(&end);
    block.push('\n');
    block
}

/// `existing` with the block of `interface` replaced by `block`, or removed when `block` is `None`. Every other
/// byte stays as it was. A missing block is appended at the end; several blocks for one interface (a copy made by
/// hand) become one, at the place of the first. A begin marker without its end is an error: guessing where the
/// block ends could delete lines that are not ours.
pub fn splice(existing: &str, interface: &str, block: Option<&str>) -> Result<String, (String, String)> {
    let (begin, end) = markers(interface);
    let mut out = String::with_capacity(existing.len() + block.map_or(0, str::len));
    let mut inside = false;
    let mut placed = false;
    for line in existing.split_inclusive('\n') {
        let bare = line.strip_suffix('\n').unwrap_or(line);
        let bare = bare.strip_suffix('\r').unwrap_or(bare);
        if inside {
            if bare == end {
                inside = false;
            }
            continue;
        }
        if bare == begin {
            inside = true;
            if !placed {
                out.push_str(block.unwrap_or_default());
                placed = true;
            }
            continue;
        }
        out.push_str(line);
    }
    if inside {
        return Err((begin, end));
    }
    if !placed && let Some(block) = block {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(block);
    }
    Ok(out)
}

/// One interface's block in one hosts file.
#[derive(Debug, Clone)]
pub struct HostsFile {
    pub path: PathBuf,
    pub interface: String,
}

impl HostsFile {
    pub fn new(path: impl Into<PathBuf>, interface: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            interface: interface.into(),
        }
    }

    /// Writes the block for `table` (or removes it: `None`). Returns whether the file changed.
    pub fn write(&self, table: Option<&NameTable>) -> Result<bool, HostsError> {
        let block = table.map(|t| render_block(&self.interface, t));
        let (_lock, mut file) = self.open_locked()?;
        let mut existing = String::new();
        file.read_to_string(&mut existing).map_err(|e| self.io(e))?;
        let updated =
            splice(&existing, &self.interface, block.as_deref()).map_err(|(begin, end)| HostsError::Unbalanced {
                path: self.path.display().to_string(),
                begin,
                end,
            })?;
        if updated == existing {
            return Ok(false);
        }
        match self.replace(&file, &updated) {
            Ok(()) => {}
            Err(e) if in_place_helps(&e) => {
                tracing::debug!(path = %self.path.display(), "cannot rename over the hosts file ({e}); rewriting it in place");
                rewrite_in_place(&mut file, &updated).map_err(|e| self.io(e))?;
            }
            Err(e) => return Err(self.io(e)),
        }
        // The lock is released when `_lock` drops, after the new content is in place.
        Ok(true)
    }

    /// Takes the meshd writers' lock, then opens the file. The lock is a file of its own that is never replaced
    /// (locking the hosts file itself would lock an inode that the previous writer's rename just orphaned).
    fn open_locked(&self) -> Result<(File, File), HostsError> {
        let lock_path = lock_path();
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .or_else(|_| File::open(&lock_path))
            .map_err(|source| HostsError::Io {
                path: lock_path.display().to_string(),
                source,
            })?;
        // flock(2): blocking, released when `lock` is closed.
        lock.lock().map_err(|source| HostsError::Io {
            path: lock_path.display().to_string(),
            source,
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        Ok((lock, file))
    }

    /// Atomic replacement: a temporary file beside it with the same mode and owner, fsynced, renamed over it.
    fn replace(&self, original: &File, content: &str) -> io::Result<()> {
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut temp = tempfile_in(dir)?;
        let meta = original.metadata()?;
        temp.file.write_all(content.as_bytes())?;
        temp.file
            .set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::fchown(&temp.file, Some(meta.uid()), Some(meta.gid()))?;
        temp.file.sync_all()?;
        std::fs::rename(&temp.path, &self.path)?;
        temp.persisted = true;
        // The rename is durable once the directory is synced; a failure here only risks the old content after a
        // power loss, so it is not an error.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn io(&self, source: io::Error) -> HostsError {
        HostsError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// The lock every meshd agent on this machine takes before it writes a hosts file: one for all files and network
/// namespaces (`/run/lock` is not switched by `ip netns exec`), so agents in different namespaces merely take turns.
fn lock_path() -> PathBuf {
    let run_lock = Path::new("/run/lock");
    let dir = if run_lock.is_dir() {
        run_lock.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join("meshd-hosts.lock")
}

/// Errors after which writing in place is the way: the path is a mount point (EBUSY), on another file system than
/// its directory's temporary file (EXDEV), or the directory is not writable (EROFS, EACCES, EPERM).
fn in_place_helps(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::EXDEV | libc::EROFS | libc::EACCES | libc::EPERM)
    )
}

/// Writes `content` over the file from its start and cuts what is left of the old content.
fn rewrite_in_place(file: &mut File, content: &str) -> io::Result<()> {
    file.seek(io::SeekFrom::Start(0))?;
    file.write_all(content.as_bytes())?;
    file.set_len(content.len() as u64)?;
    file.sync_all()
}

/// A temporary file removed on drop unless it was renamed into place.
struct TempFile {
    file: File,
    path: PathBuf,
    persisted: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn tempfile_in(dir: &Path) -> io::Result<TempFile> {
    for _ in 0..16 {
        let path = dir.join(format!(".meshd-hosts-{:016x}", rand::random::<u64>()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                return Ok(TempFile {
                    file,
                    path,
                    persisted: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("could not create a temporary file"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_protocol::netmap::fixtures::{map, node};

    const ORIGINAL: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n\n# BEGIN other-tool\n10.0.0.9 x\n# END other-tool\n192.0.2.1 printer # keep me\n";

    fn table(peers: &[(i64, &str)]) -> NameTable {
        NameTable::from_map(&map(peers.iter().map(|(id, n)| node(*id, n)).collect())).expect("dns on")
    }

    #[test]
    fn block_lines_put_the_fqdn_first() {
        let block = render_block("mesh0", &table(&[(2, "gpu-server")]));
        assert_eq!(
            block,
            "# BEGIN meshd mesh0: mesh names, managed by meshd (do not edit)\n\
             10.77.0.2\tgpu-server.mesh.internal gpu-server\n\
             10.77.0.1\tlaptop.mesh.internal laptop\n\
             # END meshd mesh0\n"
        );
    }

    #[test]
    fn splice_keeps_every_other_byte() {
        let a = render_block("mesh0", &table(&[(2, "gpu-server")]));
        let b = render_block("mesh0", &table(&[(3, "renamed")]));
        let with_a = splice(ORIGINAL, "mesh0", Some(&a)).expect("spliced");
        assert_eq!(with_a, format!("{ORIGINAL}{a}"));
        let with_b = splice(&with_a, "mesh0", Some(&b)).expect("spliced");
        assert_eq!(with_b, format!("{ORIGINAL}{b}"));
        // Another interface's block is not ours.
        let other = render_block("mesh1", &table(&[(4, "x")]));
        let both = splice(&with_b, "mesh1", Some(&other)).expect("spliced");
        assert_eq!(both, format!("{ORIGINAL}{b}{other}"));
        assert_eq!(
            splice(&both, "mesh0", None).expect("removed"),
            format!("{ORIGINAL}{other}")
        );
        assert_eq!(splice(&with_b, "mesh0", None).expect("removed"), ORIGINAL);
        // A block in the middle stays where it is; a hand-made duplicate collapses into the first.
        let middle = format!("a\n{a}b\n{a}c\n");
        assert_eq!(
            splice(&middle, "mesh0", Some(&b)).expect("spliced"),
            format!("a\n{b}b\nc\n")
        );
        // No trailing newline, CRLF lines, empty file.
        assert_eq!(splice("x", "mesh0", Some(&a)).expect("spliced"), format!("x\n{a}"));
        let crlf = format!("x\r\n{}", a.replace('\n', "\r\n"));
        assert_eq!(splice(&crlf, "mesh0", None).expect("removed"), "x\r\n");
        assert_eq!(splice("", "mesh0", Some(&a)).expect("spliced"), a);
        // A begin marker without its end is refused, not guessed at.
        let broken = format!("{ORIGINAL}{}", a.lines().next().expect("begin"));
        assert!(splice(&broken, "mesh0", Some(&b)).is_err());
    }

    #[test]
    fn writes_atomically_only_when_needed_and_removes_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        std::fs::write(&path, ORIGINAL).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let hosts = HostsFile::new(&path, "mesh0");
        let t = table(&[(2, "gpu-server")]);
        assert!(hosts.write(Some(&t)).expect("written"));
        let inode = std::fs::metadata(&path).expect("meta").ino();
        assert!(
            !hosts.write(Some(&t)).expect("unchanged"),
            "no write when nothing changed"
        );
        assert_eq!(std::fs::metadata(&path).expect("meta").ino(), inode);
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o644,
            "mode kept"
        );
        assert!(
            std::fs::read_to_string(&path)
                .expect("read")
                .contains("gpu-server.mesh.internal")
        );
        assert!(hosts.write(None).expect("removed"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), ORIGINAL);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn a_crash_half_way_leaves_the_old_file_and_the_next_start_repairs_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        std::fs::write(&path, ORIGINAL).expect("write");
        let hosts = HostsFile::new(&path, "mesh0");
        hosts.write(Some(&table(&[(2, "old-name")]))).expect("written");
        let before_crash = std::fs::read_to_string(&path).expect("read");
        // A crash after the temporary file was written but before the rename: the file is untouched, and the
        // stray temporary file is never read.
        let stray = dir.path().join(".meshd-hosts-deadbeefdeadbeef");
        std::fs::write(&stray, "garbage half written").expect("stray");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before_crash);
        // The next start writes the current block over the stale one: exactly one block.
        hosts.write(Some(&table(&[(2, "new-name")]))).expect("repaired");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.matches("# BEGIN meshd mesh0").count(), 1);
        assert!(text.contains("new-name") && !text.contains("old-name"));
        assert!(text.starts_with(ORIGINAL));
    }

    #[test]
    fn concurrent_writers_lose_no_block_and_no_foreign_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        std::fs::write(&path, ORIGINAL).expect("write");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let hosts = HostsFile::new(&path, format!("mesh{i}"));
                    for round in 0..25 {
                        let t = table(&[(i + 2, &format!("n{i}-r{round}"))]);
                        hosts.write(Some(&t)).expect("written");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with(ORIGINAL), "foreign lines intact");
        for i in 0..8 {
            assert_eq!(text.matches(&format!("# BEGIN meshd mesh{i}:")).count(), 1, "{text}");
            assert!(
                text.contains(&format!("n{i}-r24.mesh.internal")),
                "last write of writer {i} kept"
            );
        }
    }

    #[test]
    fn a_file_that_cannot_be_renamed_over_is_rewritten_in_place() {
        // What a rename over a bind mount (EBUSY), across file systems or in a read-only directory answers sends
        // the write down the in-place path; anything else is an error.
        for errno in [libc::EBUSY, libc::EXDEV, libc::EROFS, libc::EACCES, libc::EPERM] {
            assert!(in_place_helps(&io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
        assert!(!in_place_helps(&io::Error::from_raw_os_error(libc::ENOSPC)));
        // The in-place rewrite leaves exactly the new content, also when it is shorter than the old.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        let long = format!(
            "{ORIGINAL}{}",
            render_block("mesh0", &table(&[(2, "a-rather-long-name")]))
        );
        std::fs::write(&path, &long).expect("write");
        let mut file = OpenOptions::new().read(true).write(true).open(&path).expect("open");
        rewrite_in_place(&mut file, ORIGINAL).expect("rewritten");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), ORIGINAL);
    }
}

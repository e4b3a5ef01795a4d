//! The SFTP requests on the filesystem, with std's file API, as the user the process runs as.
//!
//! Relative paths are relative to the working directory (the home). Open files and
//! directories live in a table of handles; each request is answered from the result of one
//! system call or a few, and every failure maps to the SFTP status a client expects
//! (`NoSuchFile`, `PermissionDenied`, else `Failure` with the system's message). Names that are
//! not UTF-8 are shown lossily (russh-sftp's paths are strings).

use std::collections::HashMap;
use std::fs::{File as StdFile, FileTimes, Metadata, OpenOptions, ReadDir};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::{Handler, StatusReply};

/// The most bytes one read answers with (OpenSSH's client asks for at most this much).
const MAX_READ: u32 = 256 * 1024;

/// Directory entries per `readdir` answer.
const DIR_BATCH: usize = 64;

/// The server state of one session: where relative paths start, and the open handles.
pub struct Fs {
    /// The working directory: relative paths are resolved against it.
    cwd: PathBuf,
    /// Open files and directories by handle string.
    handles: HashMap<String, Open>,
    /// The next handle number.
    next: u64,
}

/// What a handle refers to.
enum Open {
    File(StdFile),
    /// A directory being listed; `None` once its entries are exhausted.
    Dir(PathBuf, Option<ReadDir>),
}

impl Fs {
    /// A session whose relative paths start at `cwd`.
    pub fn new(cwd: PathBuf) -> Fs {
        Fs {
            cwd,
            handles: HashMap::new(),
            next: 0,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() {
            self.cwd.clone()
        } else {
            self.cwd.join(p)
        }
    }

    fn insert(&mut self, open: Open) -> String {
        self.next += 1;
        let handle = self.next.to_string();
        self.handles.insert(handle.clone(), open);
        handle
    }

    fn file(&self, handle: &str) -> Result<&StdFile, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }
}

/// The SFTP status for an I/O error.
fn status(e: io::Error) -> StatusReply {
    match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile.with_message(e.to_string()),
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied.with_message(e.to_string()),
        _ => StatusCode::Failure.with_message(e.to_string()),
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Success".to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

/// SFTP attributes of `m`: size, owner, the whole `st_mode` (type and permissions), times.
fn attributes(m: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(m.len()),
        uid: Some(m.uid()),
        gid: Some(m.gid()),
        permissions: Some(m.mode()),
        atime: Some(u32::try_from(m.atime()).unwrap_or(0)),
        mtime: Some(u32::try_from(m.mtime()).unwrap_or(0)),
        ..Default::default()
    }
}

/// A directory entry with an `ls -l` style long name (`sftp ls -l` prints it as it is).
fn listed(name: String, m: &Metadata) -> File {
    let mut file = File::new(name, attributes(m));
    // russh-sftp's long name knows directories only; say links, devices... too.
    let kind = match m.mode() & 0o170000 {
        0o040000 => "d",
        0o120000 => "l",
        0o020000 => "c",
        0o060000 => "b",
        0o010000 => "p",
        0o140000 => "s",
        _ => "-",
    };
    if !file.longname.is_empty() {
        file.longname.replace_range(0..1, kind);
    }
    file
}

/// `path` made absolute against `cwd` with `.` and `..` removed, for a path that does not
/// exist (an existing one is canonicalized by the kernel's view instead).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn times(attrs: &FileAttributes) -> Option<FileTimes> {
    let (atime, mtime) = (attrs.atime?, attrs.mtime?);
    let at = |s: u32| UNIX_EPOCH + Duration::from_secs(u64::from(s));
    Some(
        FileTimes::new()
            .set_accessed(at(atime))
            .set_modified(at(mtime)),
    )
}

/// Applies `attrs` to an open file.
fn set_file_attributes(f: &StdFile, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        f.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        let m = f.metadata()?;
        if attrs.uid.is_some_and(|u| u != m.uid()) || attrs.gid.is_some_and(|g| g != m.gid()) {
            std::os::unix::fs::fchown(f, attrs.uid, attrs.gid)?;
        }
    }
    if let Some(t) = times(attrs) {
        f.set_times(t)?;
    }
    Ok(())
}

/// Applies `attrs` to `path` (following symlinks, as OpenSSH's server does).
fn set_path_attributes(path: &Path, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        let m = std::fs::metadata(path)?;
        if attrs.uid.is_some_and(|u| u != m.uid()) || attrs.gid.is_some_and(|g| g != m.gid()) {
            std::os::unix::fs::chown(path, attrs.uid, attrs.gid)?;
        }
    }
    if let Some(t) = times(attrs) {
        StdFile::open(path)?.set_times(t)?;
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset`, fewer only at the end of the file.
fn read_at(f: &StdFile, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len.min(MAX_READ) as usize];
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

impl Handler for Fs {
    type Error = StatusReply;

    fn unimplemented(&self) -> StatusReply {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusReply> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, StatusReply> {
        let mut opts: OpenOptions = pflags.into();
        opts.mode(attrs.permissions.map_or(0o666, |m| m & 0o7777));
        let f = opts.open(self.path(&filename)).map_err(status)?;
        let handle = self.insert(Open::File(f));
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusReply> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusReply> {
        let data = read_at(self.file(&handle)?, offset, len).map_err(status)?;
        if data.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, StatusReply> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let m = std::fs::symlink_metadata(self.path(&path)).map_err(status)?;
        Ok(Attrs {
            id,
            attrs: attributes(&m),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let m = std::fs::metadata(self.path(&path)).map_err(status)?;
        Ok(Attrs {
            id,
            attrs: attributes(&m),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusReply> {
        let m = match self.handles.get(&handle) {
            Some(Open::File(f)) => f.metadata(),
            Some(Open::Dir(path, _)) => std::fs::metadata(path),
            None => return Err(StatusCode::Failure.with_message("invalid handle")),
        }
        .map_err(status)?;
        Ok(Attrs {
            id,
            attrs: attributes(&m),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        set_path_attributes(&self.path(&path), &attrs).map_err(status)?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        match self.handles.get(&handle) {
            Some(Open::File(f)) => set_file_attributes(f, &attrs),
            Some(Open::Dir(path, _)) => set_path_attributes(path, &attrs),
            None => return Err(StatusCode::Failure.with_message("invalid handle")),
        }
        .map_err(status)?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, StatusReply> {
        let path = self.path(&path);
        let entries = std::fs::read_dir(&path).map_err(status)?;
        let handle = self.insert(Open::Dir(path, Some(entries)));
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusReply> {
        let Some(Open::Dir(_, slot)) = self.handles.get_mut(&handle) else {
            return Err(StatusCode::Failure.with_message("invalid handle"));
        };
        let Some(entries) = slot.as_mut() else {
            return Err(StatusReply::new(StatusCode::Eof));
        };
        let mut files = Vec::new();
        for entry in entries.by_ref() {
            // An entry removed meanwhile is skipped, as ls would.
            let Ok(entry) = entry else { continue };
            let Ok(m) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push(listed(name, &m));
            if files.len() == DIR_BATCH {
                break;
            }
        }
        if files.is_empty() {
            *slot = None;
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusReply> {
        std::fs::remove_file(self.path(&filename)).map_err(status)?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        std::fs::DirBuilder::new()
            .mode(attrs.permissions.map_or(0o777, |m| m & 0o7777))
            .create(self.path(&path))
            .map_err(status)?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, StatusReply> {
        std::fs::remove_dir(self.path(&path)).map_err(status)?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let path = self.path(&path);
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| normalize(&path));
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusReply> {
        let (from, to) = (self.path(&oldpath), self.path(&newpath));
        // SFTP v3: renaming onto an existing name is an error (OpenSSH's server agrees).
        if std::fs::symlink_metadata(&to).is_ok() {
            return Err(StatusCode::Failure.with_message(format!("{newpath} already exists")));
        }
        std::fs::rename(from, to).map_err(status)?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let target = std::fs::read_link(self.path(&path)).map_err(status)?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, StatusReply> {
        // OpenSSH sends the target first and the link's own path second (the reverse of the
        // draft's order), and every common client follows it; russh-sftp names the fields in
        // the draft's order.
        let (target, link) = (linkpath, targetpath);
        std::os::unix::fs::symlink(target, self.path(&link)).map_err(status)?;
        Ok(ok(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_dots_and_stays_under_root() {
        assert_eq!(
            normalize(Path::new("/home/a/./b/../c")),
            Path::new("/home/a/c")
        );
        assert_eq!(normalize(Path::new("/../../x")), Path::new("/x"));
    }

    #[test]
    fn io_errors_map_to_sftp_statuses() {
        let e = |k| status(io::Error::from(k)).status_code;
        assert_eq!(e(io::ErrorKind::NotFound), StatusCode::NoSuchFile);
        assert_eq!(
            e(io::ErrorKind::PermissionDenied),
            StatusCode::PermissionDenied
        );
        assert_eq!(e(io::ErrorKind::AlreadyExists), StatusCode::Failure);
    }
}

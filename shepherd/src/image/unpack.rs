//! Applying image layers, bottom first, to a staging tree: the tar stream of each layer is
//! extracted entry by entry below a directory descriptor of the tree's root, never following
//! anything in the tree.
//!
//! * Every entry's path is split into components; `.` and empty components are dropped, a
//!   leading `/` means the image's root, and a `..` component refuses the layer. Each parent
//!   directory is opened from the root one component at a time with `O_DIRECTORY|O_NOFOLLOW`
//!   (missing ones are made with `mkdirat`), so a symbolic link in the tree (`lib -> /etc`,
//!   `up -> ../..`) refuses an entry below it instead of being followed; the entry itself is
//!   created with `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, `mkdirat`, `symlinkat` or `linkat`
//!   relative to its parent's descriptor, after whatever was there is removed (a directory
//!   over a directory keeps it, as in overlay layers).
//! * Symbolic links are stored as links with their targets verbatim (they mean something only
//!   inside the guest). Hard links link to an entry already in the tree, found the same way
//!   (the link itself, not what it points to).
//! * OCI whiteouts: `.wh.NAME` removes NAME as the layers below had it; `.wh..wh..opq` makes
//!   its directory opaque: everything in it that this layer did not put there is removed.
//! * Owners (uid/gid of the header), modes with their setuid, setgid and sticky bits, mtimes
//!   and extended attributes (PAX `SCHILY.xattr.*`) are kept, applied through the entry's own
//!   descriptor (chown first: it clears setuid bits and file capabilities). Directory mtimes
//!   are applied last, when no more entries change them.
//! * Character and block devices are skipped with a warning (the guest has its own `/dev`);
//!   FIFOs are made.
//!
//! The caller makes the tree's root in a directory only root can reach, so the setuid files in
//! it are of no use to anyone on the host.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::XattrFlags;
use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

/// Deepest path accepted in a layer (it bounds the recursion that removes trees).
pub const MAX_DEPTH: usize = 512;
/// Warnings kept; more are counted.
const MAX_WARNINGS: usize = 50;
const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Why a layer cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("entry {path:?}: {detail}")]
    Refused { path: String, detail: String },
    #[error("entry {path:?}: {what}: {error}")]
    Io {
        path: String,
        what: &'static str,
        error: io::Error,
    },
}

fn refused(path: &str, detail: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        path: path.to_string(),
        detail: detail.into(),
    }
}

fn io_err<'a>(path: &'a str, what: &'static str) -> impl FnOnce(Errno) -> UnpackError + 'a {
    move |e| UnpackError::Io {
        path: path.to_string(),
        what,
        error: e.into(),
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Why a directory of the tree could not be opened.
enum Walk {
    /// It (or a directory above it) does not exist.
    Missing,
    /// A component is not a directory: the path up to it, and whether it is a symbolic link.
    NotDir(String, bool),
    Failed(Errno),
}

/// The components of `raw` below the image root, or `None` when one is `..`.
fn components(raw: &[u8]) -> Option<Vec<&[u8]>> {
    raw.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| (c != b"..").then_some(c))
        .collect()
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the header and PAX records say about an entry's inode.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>, path: &str) -> Result<Meta, UnpackError> {
        let bad = |what: &str| refused(path, format!("bad {what} in its header"));
        let header = entry.header();
        let mode = header.mode().map_err(|_| bad("mode"))? & 0o7777;
        // -1 is "no change" to chown.
        let id = |v: u64, what: &str| {
            u32::try_from(v)
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| bad(what))
        };
        let uid = id(header.uid().map_err(|_| bad("uid"))?, "uid")?;
        let gid = id(header.gid().map_err(|_| bad("gid"))?, "gid")?;
        let secs = header.mtime().map_err(|_| bad("mtime"))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(secs).map_err(|_| bad("mtime"))?,
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Read)?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                        mtime = t;
                    }
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }
}

/// A PAX time, `SECONDS[.FRACTION]`.
fn parse_pax_time(text: &str) -> Option<Timespec> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let tv_sec = secs.parse::<i64>().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tv_nsec = if digits.is_empty() {
        0
    } else {
        digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32)
    };
    // A negative time with a fraction counts the fraction downwards.
    Some(if tv_sec < 0 && tv_nsec > 0 {
        Timespec {
            tv_sec: tv_sec - 1,
            tv_nsec: 1_000_000_000 - tv_nsec,
        }
    } else {
        Timespec { tv_sec, tv_nsec }
    })
}

/// A staging tree that layers are applied to.
pub struct Staging {
    root: OwnedFd,
    /// Whether owners are set (only root may; without, everything is the caller's).
    owners: bool,
    /// Directory mtimes, applied by [`Staging::finish`].
    dir_times: BTreeMap<Vec<u8>, Timespec>,
    warnings: Vec<String>,
    more_warnings: usize,
}

impl Staging {
    /// Opens the (empty) directory `root` to apply layers to.
    pub fn open(root: &Path) -> Result<Staging, UnpackError> {
        let path = root.display().to_string();
        let fd = rfs::open(root, dir_flags(), Mode::empty()).map_err(io_err(&path, "opening"))?;
        Ok(Staging {
            root: fd,
            owners: nix::unistd::geteuid().is_root(),
            dir_times: BTreeMap::new(),
            warnings: Vec::new(),
            more_warnings: 0,
        })
    }

    fn warn(&mut self, warning: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(warning);
        } else {
            self.more_warnings += 1;
        }
    }

    /// Applies one layer's (uncompressed) tar stream, reading it to its end.
    pub fn apply_layer<R: Read>(&mut self, layer: &mut R) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(layer);
        // Paths this layer made (and their directories), which its opaque whiteouts keep.
        let mut made: HashSet<Vec<u8>> = HashSet::new();
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let mut entry = entry.map_err(UnpackError::Read)?;
            self.apply_entry(&mut entry, &mut made)?;
        }
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(UnpackError::Read)?;
        Ok(())
    }

    /// Applies the directories' mtimes; returns the warnings.
    pub fn finish(mut self) -> Result<Vec<String>, UnpackError> {
        let mut dirs: Vec<(Vec<u8>, Timespec)> =
            std::mem::take(&mut self.dir_times).into_iter().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.split(|b| *b == b'/').count()));
        for (path, mtime) in dirs {
            let parts = if path.is_empty() {
                Vec::new()
            } else {
                path.split(|b| *b == b'/').collect()
            };
            // A directory removed or replaced by a later layer has nothing to set.
            if let Ok(fd) = self.open_dir(&parts, false) {
                let times = Timestamps {
                    last_access: mtime,
                    last_modification: mtime,
                };
                rfs::futimens(&fd, &times).map_err(io_err(&shown(&path), "setting times"))?;
            }
        }
        if self.more_warnings > 0 {
            let more = self.more_warnings;
            self.warnings.push(format!("... and {more} more warnings"));
        }
        Ok(self.warnings)
    }

    /// Reads regular file `path` of the tree (at most `limit` bytes), never following links;
    /// `None` when it is not there or not a regular file.
    pub fn read_file(&self, path: &str, limit: u64) -> Option<Vec<u8>> {
        let parts = components(path.as_bytes())?;
        let (name, dirs) = parts.split_last()?;
        let dir = self.open_dir(dirs, false).ok()?;
        let fd = rfs::openat(
            &dir,
            *name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        let file = File::from(fd);
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(limit).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Opens directory `parts` of the tree, one component at a time, never following a
    /// symbolic link; with `create`, makes missing directories (mode 0755, the caller's).
    fn open_dir(&self, parts: &[&[u8]], create: bool) -> Result<OwnedFd, Walk> {
        let mut current =
            rfs::openat(&self.root, ".", dir_flags(), Mode::empty()).map_err(Walk::Failed)?;
        for (i, part) in parts.iter().enumerate() {
            let next = match rfs::openat(&current, *part, dir_flags(), Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rfs::mkdirat(&current, *part, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(Walk::Failed(e)),
                    }
                    let fd = rfs::openat(&current, *part, dir_flags(), Mode::empty())
                        .map_err(Walk::Failed)?;
                    // The umask must not narrow it.
                    rfs::fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(Walk::Failed)?;
                    Ok(fd)
                }
                other => other,
            };
            current = match next {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Err(Walk::Missing),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let link = rfs::statat(&current, *part, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                    return Err(Walk::NotDir(shown(&join(&parts[..=i])), link));
                }
                Err(e) => return Err(Walk::Failed(e)),
            };
        }
        Ok(current)
    }

    /// Gives entry `name` of `dir` (not what it may link to) the owner of its header, when
    /// owners are kept.
    fn chown_at(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        if self.owners {
            rfs::chownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io_err(path, "setting the owner"))?;
        }
        Ok(())
    }

    /// The parent directory of an entry (made when missing) and the entry's name.
    fn parent<'p>(
        &self,
        parts: &[&'p [u8]],
        path: &str,
    ) -> Result<(OwnedFd, &'p [u8]), UnpackError> {
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| refused(path, "it would replace the image's root directory"))?;
        let dir = self.open_dir(dirs, true).map_err(|w| walk_error(w, path))?;
        Ok((dir, name))
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        made: &mut HashSet<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let path = shown(&raw);
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let parts = components(&raw).ok_or_else(|| {
            refused(
                &path,
                "its path has a `..` component, which would leave the image",
            )
        })?;
        if parts.len() > MAX_DEPTH {
            return Err(refused(
                &path,
                format!("deeper than {MAX_DEPTH} directories"),
            ));
        }
        if let Some((name, dirs)) = parts.split_last() {
            if *name == OPAQUE {
                return self.make_opaque(dirs, made, &path);
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                return self.whiteout(dirs, hidden, made, &path);
            }
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            self.warn(format!(
                "skipped device node {path} (device nodes are not imported; the guest has its \
                 own /dev)"
            ));
            return Ok(());
        }
        let meta = Meta::of(entry, &path)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.write_file(&parts, entry, &meta, &path)?
            }
            tar::EntryType::Directory => self.make_dir(&parts, &meta, &path)?,
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.make_symlink(&parts, &target, &meta, &path)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.make_hard_link(&parts, &target, &path)?;
            }
            tar::EntryType::Fifo => self.make_fifo(&parts, &meta, &path)?,
            other => {
                self.warn(format!(
                    "skipped {path}: unsupported tar entry type {other:?}"
                ));
                return Ok(());
            }
        }
        for i in 1..=parts.len() {
            made.insert(join(&parts[..i]));
        }
        Ok(())
    }

    /// Removes whatever is at `name` in `dir`, unless it is a directory and `keep_dir`; returns
    /// whether a directory was kept.
    fn clear(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
        path: &str,
    ) -> Result<bool, UnpackError> {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err(path, "examining")(e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if keep_dir {
                    Ok(true)
                } else {
                    remove_tree(dir, name, 0).map_err(io_err(path, "removing"))?;
                    Ok(false)
                }
            }
            Ok(_) => {
                rfs::unlinkat(dir, name, AtFlags::empty()).map_err(io_err(path, "removing"))?;
                Ok(false)
            }
        }
    }

    /// Sets owner, extended attributes, mode and (but for directories) times through `fd`.
    fn set_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        path: &str,
        times: bool,
    ) -> Result<(), UnpackError> {
        if self.owners {
            rfs::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(io_err(path, "setting the owner"))?;
        }
        for (name, value) in &meta.xattrs {
            if let Err(e) = rfs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty()) {
                let name = shown(name);
                self.warn(format!(
                    "{path}: extended attribute {name} not kept: {}",
                    io::Error::from(e)
                ));
            }
        }
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(io_err(path, "setting the mode"))?;
        if times {
            rfs::futimens(fd, &meta.times()).map_err(io_err(path, "setting times"))?;
        }
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        parts: &[&[u8]],
        data: &mut R,
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        let (dir, name) = self.parent(parts, path)?;
        self.clear(&dir, name, false, path)?;
        let fd = rfs::openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(path, "creating"))?;
        let mut file = File::from(fd);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = data.read(&mut buf).map_err(UnpackError::Read)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(|e| UnpackError::Io {
                path: path.to_string(),
                what: "writing",
                error: e,
            })?;
        }
        self.set_meta(file.as_fd(), meta, path, true)
    }

    fn make_dir(&mut self, parts: &[&[u8]], meta: &Meta, path: &str) -> Result<(), UnpackError> {
        let fd = if parts.is_empty() {
            rfs::openat(&self.root, ".", dir_flags(), Mode::empty())
                .map_err(io_err(path, "opening"))?
        } else {
            let (dir, name) = self.parent(parts, path)?;
            if !self.clear(&dir, name, true, path)? {
                rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(io_err(path, "making the directory"))?;
            }
            rfs::openat(&dir, name, dir_flags(), Mode::empty()).map_err(io_err(path, "opening"))?
        };
        self.set_meta(fd.as_fd(), meta, path, false)?;
        self.dir_times.insert(join(parts), meta.mtime);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        parts: &[&[u8]],
        target: &[u8],
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        if target.is_empty() {
            return Err(refused(path, "a symbolic link without a target"));
        }
        let (dir, name) = self.parent(parts, path)?;
        self.clear(&dir, name, false, path)?;
        rfs::symlinkat(target, &dir, name).map_err(io_err(path, "making the symbolic link"))?;
        self.chown_at(&dir, name, meta, path)?;
        rfs::utimensat(&dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err(path, "setting times"))?;
        if !meta.xattrs.is_empty() {
            self.warn(format!(
                "{path}: extended attributes of a symbolic link not kept"
            ));
        }
        Ok(())
    }

    fn make_hard_link(
        &mut self,
        parts: &[&[u8]],
        target: &[u8],
        path: &str,
    ) -> Result<(), UnpackError> {
        let shown_target = shown(target);
        let target_parts = components(target).ok_or_else(|| {
            refused(
                path,
                format!("hard link to {shown_target:?}, which has a `..` component"),
            )
        })?;
        let not_in_image = || {
            refused(
                path,
                format!("hard link to {shown_target:?}, which is not in the image"),
            )
        };
        let (target_name, target_dirs) = target_parts.split_last().ok_or_else(not_in_image)?;
        if target_parts == parts {
            return Ok(());
        }
        let target_dir = match self.open_dir(target_dirs, false) {
            Ok(fd) => fd,
            Err(Walk::Missing) => return Err(not_in_image()),
            Err(w) => return Err(walk_error(w, &format!("{path} (hard link target)"))),
        };
        match rfs::statat(&target_dir, *target_name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => return Err(not_in_image()),
            Err(e) => return Err(io_err(path, "examining the hard link's target")(e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(refused(
                    path,
                    format!("hard link to directory {shown_target:?}"),
                ))
            }
            Ok(_) => {}
        }
        let (dir, name) = self.parent(parts, path)?;
        self.clear(&dir, name, false, path)?;
        // No AT_SYMLINK_FOLLOW: a link to a symbolic link links the link itself.
        rfs::linkat(&target_dir, *target_name, &dir, name, AtFlags::empty()).map_err(|e| {
            if e == Errno::NOENT {
                not_in_image()
            } else {
                io_err(path, "making the hard link")(e)
            }
        })
    }

    fn make_fifo(&mut self, parts: &[&[u8]], meta: &Meta, path: &str) -> Result<(), UnpackError> {
        let (dir, name) = self.parent(parts, path)?;
        self.clear(&dir, name, false, path)?;
        rfs::mkfifoat(&dir, name, Mode::from_raw_mode(0o600))
            .map_err(io_err(path, "making the FIFO"))?;
        self.chown_at(&dir, name, meta, path)?;
        // Only this process writes the tree, so `name` is still the FIFO just made.
        rfs::chmodat(&dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
            .map_err(io_err(path, "setting the mode"))?;
        rfs::utimensat(&dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err(path, "setting times"))
    }

    /// `.wh.NAME`: removes NAME as the layers below left it.
    fn whiteout(
        &mut self,
        dirs: &[&[u8]],
        hidden: &[u8],
        made: &HashSet<Vec<u8>>,
        path: &str,
    ) -> Result<(), UnpackError> {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(refused(path, "a whiteout that names no entry"));
        }
        let dir = match self.open_dir(dirs, false) {
            Ok(fd) => fd,
            Err(Walk::Missing) => return Ok(()),
            Err(w) => return Err(walk_error(w, path)),
        };
        let mut target = dirs.to_vec();
        target.push(hidden);
        if made.contains(&join(&target)) {
            return Ok(());
        }
        self.clear(&dir, hidden, false, path)?;
        Ok(())
    }

    /// `.wh..wh..opq`: removes everything in the directory that this layer did not make.
    fn make_opaque(
        &mut self,
        dirs: &[&[u8]],
        made: &mut HashSet<Vec<u8>>,
        path: &str,
    ) -> Result<(), UnpackError> {
        let dir = self.open_dir(dirs, true).map_err(|w| walk_error(w, path))?;
        prune(&dir, &join(dirs), made, 0).map_err(io_err(path, "emptying the opaque directory"))?;
        for i in 1..=dirs.len() {
            made.insert(join(&dirs[..i]));
        }
        Ok(())
    }
}

fn walk_error(walk: Walk, path: &str) -> UnpackError {
    match walk {
        Walk::Missing => refused(path, "a directory of its path vanished"),
        Walk::NotDir(prefix, true) => refused(
            path,
            format!(
                "its path goes through the symbolic link {prefix:?} (links in an image are \
                 never followed while importing it)"
            ),
        ),
        Walk::NotDir(prefix, false) => {
            refused(path, format!("{prefix:?} in its path is not a directory"))
        }
        Walk::Failed(e) => io_err(path, "opening its directory")(e),
    }
}

/// The names in directory `dir`, but `.` and `..`.
fn names_in(dir: &OwnedFd) -> rustix::io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes `name` in `dir` and, when it is a directory, everything in it, never following a
/// symbolic link.
fn remove_tree(dir: &OwnedFd, name: &[u8], depth: usize) -> rustix::io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Err(Errno::ISDIR) => {}
        other => return other,
    }
    if depth > MAX_DEPTH {
        return Err(Errno::LOOP);
    }
    let sub = rfs::openat(dir, name, dir_flags(), Mode::empty())?;
    for child in names_in(&sub)? {
        remove_tree(&sub, &child, depth + 1)?;
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Removes everything below `dir` (tree path `prefix`) that is not in `keep`, descending into
/// the directories that are.
fn prune(
    dir: &OwnedFd,
    prefix: &[u8],
    keep: &HashSet<Vec<u8>>,
    depth: usize,
) -> rustix::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(Errno::LOOP);
    }
    for child in names_in(dir)? {
        let path = if prefix.is_empty() {
            child.clone()
        } else {
            [prefix, b"/", &child].concat()
        };
        if !keep.contains(&path) {
            remove_tree(dir, &child, depth)?;
            continue;
        }
        match rfs::openat(dir, child.as_slice(), dir_flags(), Mode::empty()) {
            Ok(sub) => prune(&sub, &path, keep, depth + 1)?,
            Err(Errno::NOTDIR | Errno::LOOP) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

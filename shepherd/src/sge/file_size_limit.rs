//! The job's file-size limit (`s_fsize`) on its output files. Under the stock shepherd the
//! kernel applies `RLIMIT_FSIZE` to the job's own writes to its `-o`/`-e` files: a write is cut
//! at the limit, and one at or past it gets SIGXFSZ and fails with EFBIG. Here those writes are
//! made by the VMM process, which cannot take the limit itself (QEMU's guest RAM is a memfd,
//! and a memfd is a file too), so its writer applies the same rule to the output files alone;
//! the session then sends the job SIGXFSZ, as the kernel would have.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::AsRawFd;

/// An output file with the job's file-size limit. Only regular files are limited, as by the
/// kernel (a FIFO, a terminal, `/dev/null` are not).
pub struct FileSizeLimited {
    file: File,
    limit: u64,
    append: bool,
}

impl FileSizeLimited {
    /// `file` as the job's output, limited to `limit` bytes where that applies.
    pub fn wrap(file: File, limit: Option<u64>) -> Box<dyn Write + Send> {
        let regular = file
            .metadata()
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        match limit {
            Some(limit) if regular => {
                let append = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
                    .map(|flags| flags & libc::O_APPEND != 0)
                    .unwrap_or(false);
                Box::new(FileSizeLimited {
                    file,
                    limit,
                    append,
                })
            }
            _ => Box::new(file),
        }
    }

    /// Where the next write lands: the end of the file in append mode, else the offset.
    fn position(&mut self) -> std::io::Result<u64> {
        if self.append {
            Ok(self.file.metadata()?.len())
        } else {
            self.file.stream_position()
        }
    }
}

impl Write for FileSizeLimited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let at = self.position()?;
        if at >= self.limit {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        let room = usize::try_from(self.limit - at).unwrap_or(usize::MAX);
        self.file.write(&data[..data.len().min(room)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn write_until_error(w: &mut dyn Write, total: usize) -> std::io::Error {
        let chunk = vec![b'x'; 3000];
        let mut written = 0;
        while written < total {
            if let Err(e) = w.write_all(&chunk) {
                return e;
            }
            written += chunk.len();
        }
        panic!("no error after {written} bytes");
    }

    #[test]
    fn a_regular_file_stops_at_the_limit_with_efbig() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = FileSizeLimited::wrap(File::create(&path).unwrap(), Some(10_000));
        let e = write_until_error(&mut *w, 1 << 20);
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
    }

    /// In append mode the file's size counts, as for the kernel: what was there before the
    /// job is part of the limit.
    #[test]
    fn appending_counts_what_the_file_held_already() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, vec![b'a'; 9_000]).unwrap();
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        let mut w = FileSizeLimited::wrap(file, Some(10_000));
        let e = write_until_error(&mut *w, 1 << 20);
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
    }

    #[test]
    fn no_limit_or_a_device_is_not_limited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = FileSizeLimited::wrap(File::create(&path).unwrap(), None);
        w.write_all(&[b'x'; 20_000]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 20_000);
        let null = OpenOptions::new().write(true).open("/dev/null").unwrap();
        let mut w = FileSizeLimited::wrap(null, Some(10));
        w.write_all(&[b'x'; 20_000]).unwrap();
    }
}
